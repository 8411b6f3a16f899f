"""What ``diloco bench optim`` runs: the methods, model sizes and grids, the :class:`Plan` built
from the command line, each run's config, and the time estimate.

A *method* is an optimiser set-up (:data:`METHODS`: AdamW, Muon, SNOO over either, EMA-Nesterov
K=1 and K=8, AdamW with a 2x batch, DiLoCo G=2); a *setting* is the tuned knobs on top of it
(inner LR, and K, η, μ for SNOO); a *run* is one method at one setting, size, horizon and seed
(:func:`spec`). A grid whose best point sits at its edge grows past it (:func:`beyond_edge`).
The protocol that tunes and measures them is in :mod:`diloco.bench.optim`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diloco.bench.spec import RunSpec
from diloco.config import config_from_dict, config_to_dict, load_config
from diloco.errors import ConfigError

__all__ = [
    "BASELINES", "DP_FAMILY", "MAX_EXTENSIONS", "METHODS", "Method", "Plan", "announce",
    "beyond_edge", "device_of", "estimate_s", "make_plan", "run_config", "spec",
]  # fmt: skip

#: Named model sizes for ``--sizes`` (``LxE``, e.g. ``6x256``, also works; ``config`` keeps the
#: config file's model).
PRESET_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "small": {"n_layer": 4, "n_embd": 128, "n_head": 4},
}
FULL_LR_GRID = (1e-3, 2e-3, 4e-3)
FULL_MUON_LR_GRID = (0.01, 0.02, 0.04)
#: SNOO's outer grid: K ∈ {8, 32} × η ∈ {0.5, 0.7, 1.0} × μ ∈ {0.5, 0.9}.
FULL_OUTER_GRID = tuple(itertools.product((8, 32), (0.5, 0.7, 1.0), (0.5, 0.9)))
#: --quick shrinks it to two points (one per K).
QUICK_OUTER_GRID = ((8, 0.7, 0.5), (32, 0.7, 0.9))
#: How many times in a row a sweep is extended while its best point sits at the grid's edge.
MAX_EXTENSIONS = 3
#: Defaults of a full and a --quick run (explicit flags override them).
MODES: dict[str, dict[str, Any]] = {
    "full": {"sizes": ["tiny", "small"], "steps": [200, 800], "seeds": 3},
    "quick": {"sizes": ["tiny"], "steps": [100, 250], "seeds": 2},
}


def _ema(k: int, beta: float, gamma: float) -> dict[str, Any]:
    return {
        "outer.method": "ema_nesterov",
        "outer.sync_every": k,
        "outer.lr": 1.0,
        "outer.ema_beta": beta,
        "outer.ema_gamma": gamma,
        "outer.ema_init": "first_increment",
        "outer.ema_warmup": 0.3,
        "outer.ema_rest": 0.1,
    }


@dataclass(frozen=True)
class Method:
    """One optimiser set-up of the benchmark."""

    name: str
    label: str
    inner: str  # "adamw" or "muon": which LR grid it is tuned on
    fixed: dict[str, Any]  # dotted config settings that define it
    tune_outer_at: str | None = None  # SNOO: tune (K, η, μ) at this base method's tuned LR
    outer_from: str | None = None  # DiLoCo G=2: take this method's tuned (K, η, μ)
    groups: int = 1
    batch_mult: int = 1


_NONE = {"outer.method": "none"}
METHODS: tuple[Method, ...] = (
    Method("adamw", "AdamW", "adamw", _NONE),
    Method("muon", "Muon", "muon", _NONE),
    Method("snoo_adamw", "SNOO (AdamW)", "adamw", {"outer.method": "nesterov"}, "adamw"),
    Method("snoo_muon", "SNOO (Muon)", "muon", {"outer.method": "nesterov"}, "muon"),
    Method("ema1_adamw", "EMA-Nesterov K=1 (AdamW)", "adamw", _ema(1, 0.7, 0.99)),
    Method("ema1_muon", "EMA-Nesterov K=1 (Muon)", "muon", _ema(1, 0.5, 0.995)),
    Method("ema8_adamw", "EMA-Nesterov K=8 (AdamW)", "adamw", _ema(8, 0.7, 0.99)),
    Method("adamw_2x", "AdamW 2x batch (DP)", "adamw", _NONE, batch_mult=2),
    Method(
        "diloco_g2",
        "DiLoCo G=2 (AdamW)",
        "adamw",
        {"outer.method": "nesterov", "topology.backend": "gloo"},
        outer_from="snoo_adamw",
        groups=2,
    ),
)
BY_NAME = {m.name: m for m in METHODS}
#: The compute-factor baselines: column title → method.
BASELINES = {"vs AdamW": "adamw", "vs Muon": "muon", "vs DP 2x": "adamw_2x"}
#: Methods compared with the 2x-batch data-parallel baseline (the equal-tokens G=2 pair).
DP_FAMILY = ("adamw_2x", "diloco_g2")


@dataclass
class Plan:
    """Everything that decides which runs the benchmark makes."""

    base: dict[str, dict[str, Any]]  # the base config (file + --set + --data), as a dict
    sizes: dict[str, dict[str, int]]  # size name → model.* settings
    horizons: list[int]
    seeds: int
    lr_grid: list[float]
    muon_lr_grid: list[float]
    outer_grid: list[tuple[int, float, float]]
    methods: list[Method]
    evals: int = 16
    warmup_frac: float = 0.1
    jobs: int = 1  # runs at once (CPU slots)
    threads: int | None = None  # torch threads per run (None: torch's default)
    skipped: dict[str, str] = field(default_factory=dict)  # method → why it is not run

    def eval_every(self, steps: int) -> int:
        """About ``steps / evals``, rounded down to a multiple of the largest K of the plan (at
        least one K), so that every evaluation sees freshly synchronised slow weights."""
        ks = [k for k, _, _ in self.outer_grid]
        ks += [m.fixed.get("outer.sync_every", 1) for m in self.methods]
        k = max(ks, default=1)
        return k * max(1, steps // self.evals // k)

    def n_tune_runs(self, m: Method) -> int:
        grid = len(self.lr_grid if m.inner == "adamw" else self.muon_lr_grid)
        return grid + len(self.outer_grid) - 1 if m.tune_outer_at else grid

    def n_runs(self) -> int:
        """Runs before any grid extension: every method is tuned at every horizon, and seed 0
        of its measurement is its tuning run."""
        per_horizon = sum(self.n_tune_runs(m) + self.seeds - 1 for m in self.methods)
        return per_horizon * len(self.horizons) * len(self.sizes)


# --- configs and run keys ------------------------------------------------------------------------


def _set(cfg: dict[str, dict[str, Any]], dotted: str, value: Any) -> None:
    section, key = dotted.split(".")
    cfg.setdefault(section, {})[key] = value


def run_config(
    plan: Plan, m: Method, size: str, steps: int, seed: int, settings: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The nested config dict of one run (``run.out_dir`` left to the caller)."""
    cfg = copy.deepcopy(plan.base)
    for key, value in plan.sizes[size].items():
        _set(cfg, f"model.{key}", value)
    _set(cfg, "run.seed", seed)
    _set(cfg, "run.progress", False)
    _set(cfg, "train.steps", steps)
    every = plan.eval_every(steps)
    _set(cfg, "train.eval_every", every)
    _set(cfg, "train.log_every", every)
    _set(cfg, "train.checkpoint_every", 0)
    _set(cfg, "inner.warmup_steps", min(steps - 1, round(plan.warmup_frac * steps)))
    _set(cfg, "inner.optimizer", m.inner)
    if m.inner == "muon":  # the AdamW part of Muon: the middle of the shared grid
        _set(cfg, "inner.lr", plan.lr_grid[len(plan.lr_grid) // 2])
    _set(cfg, "data.batch_size", plan.base["data"]["batch_size"] * m.batch_mult)
    _set(cfg, "topology.groups", m.groups)
    _set(cfg, "topology.shards", 1)
    for dotted, value in {**m.fixed, **settings}.items():
        _set(cfg, dotted, value)
    return cfg


def spec(
    plan: Plan, m: Method, size: str, steps: int, seed: int, settings: dict, tuning: bool = False
) -> RunSpec:
    """The :class:`RunSpec` of ``m`` at ``settings`` for one size, horizon and seed."""
    cfg = run_config(plan, m, size, steps, seed, settings)
    return RunSpec(m.name, size, steps, seed, settings, cfg, m.groups, tuning)


# --- grid extension ------------------------------------------------------------------------------


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid4(x: float) -> float:
    """The logistic function to 4 decimals (three extensions past 0.9 stay below 1)."""
    return round(1 / (1 + math.exp(-x)), 4)


def _exp3(x: float) -> float:
    """exp(x) to 3 significant digits (0.008, not 0.008000000000000002)."""
    return float(f"{math.exp(x):.3g}")


#: Each extended knob and the scale its grid steps evenly on: (to that scale, back from it).
#: K is not extended: the evaluations fall on multiples of the plan's largest K, and K is
#: also the traffic one can afford, a choice rather than a tuned value.
_SCALES: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "inner.lr": (math.log, _exp3),
    "inner.muon_lr": (math.log, _exp3),
    "outer.lr": (math.log, _exp3),
    "outer.momentum": (_logit, _sigmoid4),  # stays inside (0, 1)
}


def beyond_edge(tried: list[dict[str, Any]], best: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings that extend a sweep whose ``best`` setting sits at the edge of what was
    ``tried``: for every knob with two or more values tried and ``best``'s value the lowest or
    the highest of them, ``best`` with that knob one step further out (the step from the edge's
    neighbour to the edge, on the knob's scale: 8e-3 after 2e-3, 4e-3; μ on the logit scale,
    0.988 after 0.5, 0.9). Empty when ``best`` is inside the grid on every knob."""
    extra = []
    for key, (to, back) in _SCALES.items():
        values = sorted({s[key] for s in tried if key in s})
        if key not in best or len(values) < 2 or best[key] not in (values[0], values[-1]):
            continue
        edge, neighbour = (values[0], values[1]) if best[key] == values[0] else values[-1:-3:-1]
        value = back(2 * to(edge) - to(neighbour))
        if value not in values:
            extra.append({**best, key: value})
    return extra


# --- plan, estimate, run -------------------------------------------------------------------------


def _parse_size(spec: str) -> dict[str, int]:
    if spec in PRESET_SIZES:
        return dict(PRESET_SIZES[spec])
    if spec == "config":
        return {}
    match = re.fullmatch(r"(\d+)x(\d+)", spec)
    if not match:
        raise ConfigError(
            f"--sizes: unknown size {spec!r}; use {', '.join(PRESET_SIZES)}, config, or LxE "
            "(layers x width, e.g. 6x256)"
        )
    n_layer, n_embd = int(match[1]), int(match[2])
    return {"n_layer": n_layer, "n_embd": n_embd, "n_head": max(1, n_embd // 32)}


def device_of(base: dict[str, dict[str, Any]]) -> str:
    """The base config's device, ``auto`` resolved."""
    import torch

    device = base["run"]["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _distributed_problem(base: dict[str, dict[str, Any]], groups: int) -> str | None:
    """Why a G-group torchrun run cannot work here, or None."""
    import torch

    if device_of(base) == "cuda" and torch.cuda.device_count() < groups:
        return f"needs {groups} GPUs, found {torch.cuda.device_count()}"
    return None


def make_plan(args: argparse.Namespace) -> Plan:
    """The :class:`Plan` of the parsed ``diloco bench optim`` arguments."""
    mode = MODES["quick" if args.quick else "full"]
    cfg = load_config(args.config, args.overrides)
    base = config_to_dict(cfg)
    if args.data:
        base["data"]["source"] = args.data
    default_sizes = ["config"] if args.config else mode["sizes"]
    sizes = {s: _parse_size(s) for s in (args.sizes or default_sizes)}
    horizons = sorted(set(args.steps or mode["steps"]))
    if args.config:  # a config brings its own LR scale: grid = its lr x {1/2, 1, 2}
        lr_grid = [base["inner"]["lr"] * f for f in (0.5, 1.0, 2.0)]
        muon_grid = [base["inner"]["muon_lr"] * f for f in (0.5, 1.0, 2.0)]
    else:
        lr_grid, muon_grid = list(FULL_LR_GRID), list(FULL_MUON_LR_GRID)
    outer_grid = list(QUICK_OUTER_GRID if args.quick else FULL_OUTER_GRID)
    if args.lr_grid:
        lr_grid = args.lr_grid
    if args.muon_lr_grid:
        muon_grid = args.muon_lr_grid
    names = args.methods or [m.name for m in METHODS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(BY_NAME)}")
    wanted = set(names) | {"adamw"}  # the compute factors need the AdamW baseline
    if any(BY_NAME[n].inner == "muon" for n in wanted):
        wanted.add("muon")
    if "diloco_g2" in wanted:
        wanted |= {"snoo_adamw", "adamw_2x"}
    plan = Plan(
        base=base,
        sizes=sizes,
        horizons=horizons,
        seeds=args.seeds or mode["seeds"],
        lr_grid=lr_grid,
        muon_lr_grid=muon_grid,
        outer_grid=outer_grid,
        methods=[m for m in METHODS if m.name in wanted],
        evals=args.evals,
        warmup_frac=args.warmup_frac,
    )
    if args.tiny_test:
        _shrink_for_test(plan)
    for m in list(plan.methods):
        problem = _distributed_problem(base, m.groups) if m.groups > 1 else None
        named = bool(args.methods) and m.name in args.methods
        if problem is None and m.groups > 1 and args.tiny_test and not named:
            problem = "left out of --tiny-test unless named in --methods (slow to launch)"
        if problem:
            plan.methods.remove(m)
            plan.skipped[m.name] = problem
    # Fail on a bad corpus or model now, not after an hour of runs.
    _check_data(plan)
    return plan


def _shrink_for_test(plan: Plan) -> None:
    """--tiny-test: a seconds-long plan exercising every stage (tests only)."""
    plan.sizes = {"test": {"n_layer": 1, "n_embd": 16, "n_head": 1, "block_size": 16}}
    plan.base["data"]["batch_size"] = 4
    plan.base["train"]["eval_batches"] = 2
    plan.horizons = [10, 20]
    plan.seeds = 1
    plan.evals = 2
    plan.lr_grid = plan.lr_grid[len(plan.lr_grid) // 2 :][:1]
    plan.muon_lr_grid = plan.muon_lr_grid[len(plan.muon_lr_grid) // 2 :][:1]
    plan.outer_grid = [(5, 0.7, 0.5)]


def _check_data(plan: Plan) -> None:
    from diloco.job.data import load_corpus

    block = max(s.get("block_size", plan.base["model"]["block_size"]) for s in plan.sizes.values())
    corpus = load_corpus(plan.base["data"]["source"], block)
    if corpus.vocab_size > plan.base["model"]["vocab_size"]:
        plan.base["model"]["vocab_size"] = corpus.vocab_size  # e.g. bin: GPT-2 tokens
    for m in plan.methods:  # validate one config per method and size
        for size in plan.sizes:
            cfg = run_config(plan, m, size, plan.horizons[0], 0, {})
            _set(cfg, "run.out_dir", "unused")
            config_from_dict(cfg)


def _probe_ms(plan: Plan, out: Path, size: str, inner: str) -> float:
    """Milliseconds per inner step of a 24-step plain run (for the time estimate)."""
    from diloco.job.train import train

    m = BY_NAME[inner]
    cfg = run_config(plan, m, size, 24, 0, {})
    probe_dir = out / "probe" / f"{size}-{inner}"
    shutil.rmtree(probe_dir, ignore_errors=True)
    _set(cfg, "run.out_dir", str(probe_dir))
    _set(cfg, "train.eval_every", 0)
    summary = train(config_from_dict(cfg))
    shutil.rmtree(probe_dir.parent, ignore_errors=True)
    return summary["inner_step_ms"]


def estimate_s(plan: Plan, step_ms: dict[tuple[str, str], float]) -> float:
    """Wall seconds the plan needs given measured (size, adamw|muon) inner-step times of one
    run: the total run time divided by ``plan.jobs`` (runs at once).

    An eval costs about eval_batches / 3 steps (forward only); EMA K=1 adds ~15% per step; a
    G=2 run costs two groups' steps (one slot each) plus ~10 s to launch. Grid extensions
    (:func:`beyond_edge`) are not foreseen: each adds one run at its horizon.
    """
    total = 0.0
    for size in plan.sizes:
        for m in plan.methods:
            ms = step_ms[(size, m.inner)] * m.batch_mult * m.groups
            if m.fixed.get("outer.sync_every") == 1:
                ms *= 1.15
            eval_ms = step_ms[(size, "adamw")] * plan.base["train"]["eval_batches"] / 3
            startup = 10.0 if m.groups > 1 else 0.5
            # tuned at every horizon; seed 0 of the measurement is the tuning run
            runs = [h for h in plan.horizons for _ in range(plan.n_tune_runs(m) + plan.seeds - 1)]
            total += sum(h * ms / 1e3 + (plan.evals + 1) * eval_ms / 1e3 + startup for h in runs)
    return total / plan.jobs


def announce(plan: Plan, out: Path, probe: bool = True) -> None:
    """Print the plan; with ``probe``, time a few steps per size and print the estimate."""
    names = ", ".join(m.name for m in plan.methods)
    print(
        f"diloco bench optim: {plan.n_runs()} runs planned, more if a grid is extended ({names}; "
        f"sizes {', '.join(plan.sizes)}; horizons {plan.horizons}, each tuned; "
        f"{plan.seeds} seed(s))"
    )
    for method, why in plan.skipped.items():
        print(f"  skipping {method}: {why}")
    if not probe:
        return
    inners = sorted({m.inner for m in plan.methods})
    step_ms = {(s, i): _probe_ms(plan, out, s, i) for s in plan.sizes for i in inners}
    shown = ", ".join(f"{s}/{i} {ms:.0f} ms" for (s, i), ms in step_ms.items())
    minutes = estimate_s(plan, step_ms) / 60
    threads = f"{plan.threads} thread(s)" if plan.threads else "torch's default threads"
    print(
        f"  measured inner step: {shown}; estimated wall time {minutes:.1f} min with "
        f"{plan.jobs} run(s) at once, {threads} each (runs already in the cache cost nothing)",
        flush=True,
    )
