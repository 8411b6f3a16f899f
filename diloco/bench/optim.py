"""``diloco bench optim``: one GPT, one corpus, one token budget, several optimisers.

Does SNOO / EMA-Nesterov / DiLoCo beat a *tuned* AdamW (and Muon) here? Protocol, per model
size (``--sizes``) and per horizon (``--steps``): every method is tuned at every horizon it is
reported at, since the best LR of a short run is not the best of a long one.

1. **Tune** at the horizon with seed 0, picking the lowest final val loss:
   - every method's inner LR from the same grid: ``--lr-grid`` for AdamW-inner methods,
     ``--muon-lr-grid`` (the matrices' LR) for Muon-inner ones, whose AdamW part (embeddings,
     norms) keeps the middle value of ``--lr-grid``;
   - SNOO (outer Nesterov, one group): the outer grid (K, η, μ) at the tuned LR of its base
     (AdamW or Muon) at the same horizon, then the LR grid at the best outer setting
     (coordinate descent: the full K × η × μ × LR product does not fit a CPU budget);
   - EMA-Nesterov (outer lr 1, m initialised to the first increment, β = 0 for the first 30% and
     last 10% of the steps): K=1 (the paper's form) with AdamW (β 0.7, γ 0.99) and Muon
     (β 0.5, γ 0.995), and K=8 with AdamW;
   - DiLoCo with G=2 groups (each its own batch; a torchrun subprocess of 2 ranks) at SNOO-AdamW's
     tuned outer setting, against data-parallel AdamW with a 2x batch: equal tokens per step.
   Whenever a sweep's best point sits at the edge of its grid (the lowest or highest LR, η or
   μ tried), the sweep goes one step further out on that knob
   (:func:`diloco.bench.plan.beyond_edge`), up to ``MAX_EXTENSIONS`` times in a row.
2. **Measure**: each method's best setting at a horizon runs there with ``--seeds`` seeds (seed 0
   is the tuning run itself, from the cache).
3. **Report**: final val loss (mean ± std over seeds, on the slow weights θ) and the compute
   factor (:mod:`diloco.bench.compute_factor`) on the seed-mean eval curves, with tokens as x:
   vs tuned AdamW, vs tuned Muon, and for the G=2 pair vs the 2x-batch AdamW.

Every method shares the base config's LR schedule family (``--warmup-frac`` of the horizon for
warm-up), the seeded data stream (``run.seed``) and the horizon's token budget. Evaluations fall
every ~horizon/``--evals`` steps, rounded to a multiple of the plan's largest K, so SNOO's slow
weights are freshly synchronised at every eval point.

The runs go through :class:`diloco.bench.runner.Runner`: ``--jobs`` at a time (on CPU one per
core, one torch thread each), every (size, method) tuned and then measured as soon as the
setting it starts from is known, each run cached in ``OUT/runs/<key>`` (``key`` hashes the
resolved config) so an interrupted benchmark continues where it stopped.

Outputs in ``--out``: ``results.json`` (every run), ``results.md`` (the tables, also printed)
and ``curves.png`` (val loss against tokens of each method's best setting).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from diloco.bench.compute_factor import compute_factor, factor_bound, format_factor, mean_curve
from diloco.bench.plan import (
    BASELINES,
    BY_NAME,
    DP_FAMILY,
    MAX_EXTENSIONS,
    Method,
    Plan,
    announce,
    beyond_edge,
    device_of,
    make_plan,
    spec,
)
from diloco.bench.report import hardware, plot_curves, render_markdown
from diloco.bench.runner import Runner
from diloco.bench.spec import settings_label
from diloco.errors import ConfigError

__all__ = ["add_arguments", "run_bench", "run_from_args"]


# --- the protocol --------------------------------------------------------------------------------


def _loss_or_inf(result: dict[str, Any]) -> float:
    loss = result["final_val_loss"]
    return loss if loss is not None else math.inf


def _lr_key(m: Method) -> str:
    return "inner.lr" if m.inner == "adamw" else "inner.muon_lr"


def _outer_part(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k.startswith("outer.")}


def _tune_method(
    plan: Plan,
    runner: Runner,
    size: str,
    steps: int,
    m: Method,
    tuned: Callable[[str], dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``m``'s best setting at horizon ``steps`` (seed 0) and its tuning results, in order.

    ``tuned(name)`` blocks until method ``name``'s best setting at this horizon is known ({} if
    it is not in the plan): SNOO starts from its base's tuned LR, DiLoCo G=2 from SNOO-AdamW's
    outer setting.
    """
    tried: list[dict[str, Any]] = []
    grid = plan.lr_grid if m.inner == "adamw" else plan.muon_lr_grid

    def sweep(candidates: list[dict[str, Any]]) -> dict[str, Any]:
        """The best of ``candidates``, the grid extended while its best sits at an edge."""
        results: list[dict[str, Any]] = []
        for _ in range(1 + MAX_EXTENSIONS):
            specs = [spec(plan, m, size, steps, 0, s, tuning=True) for s in candidates]
            results += runner.run_all(specs)
            best = min(results, key=_loss_or_inf)
            if not math.isfinite(_loss_or_inf(best)):
                break
            candidates = beyond_edge([r["settings"] for r in results], best["settings"])
            if not candidates:
                break
        tried.extend(r for r in results if r not in tried)  # SNOO's LR sweep repeats a point
        return best["settings"]

    def lr_sweep(fixed: dict[str, Any], also: tuple[float, ...] = ()) -> dict[str, Any]:
        return sweep([{**fixed, _lr_key(m): lr} for lr in sorted({*grid, *also})])

    if m.tune_outer_at:
        lr = tuned(m.tune_outer_at).get(_lr_key(m), grid[len(grid) // 2])
        chosen = sweep(
            [
                {_lr_key(m): lr, "outer.sync_every": k, "outer.lr": eta, "outer.momentum": mu}
                for k, eta, mu in plan.outer_grid
            ]
        )
        # the base's LR, found past the grid's edge, stays a candidate at the chosen (K, η, μ)
        return lr_sweep(_outer_part(chosen), (lr,)), tried
    if m.outer_from:
        fixed = _outer_part(tuned(m.outer_from))
        if not fixed:
            k, eta, mu = plan.outer_grid[0]
            fixed = {"outer.sync_every": k, "outer.lr": eta, "outer.momentum": mu}
        return lr_sweep(fixed), tried
    return lr_sweep({}), tried


#: (size, horizon, method name): one tuning of the protocol.
Cell = tuple[str, int, str]


def _run_protocol(plan: Plan, runner: Runner) -> tuple[dict[str, dict[int, dict]], list[dict]]:
    """Tune, then measure, every (size, horizon, method) concurrently, each as soon as the
    setting it starts from is tuned. Returns the best settings (size → horizon → method →
    settings) and every tuning result in plan order."""
    best: dict[Cell, Future] = {cell: Future() for cell in _cells(plan)}
    tried: dict[Cell, list[dict]] = {}

    def tuned(size: str, steps: int, name: str) -> dict[str, Any]:
        future = best.get((size, steps, name))
        return future.result() if future is not None else {}

    def pipeline(size: str, steps: int, name: str) -> None:
        future, m = best[(size, steps, name)], BY_NAME[name]
        try:
            settings, tried[(size, steps, name)] = _tune_method(
                plan, runner, size, steps, m, functools.partial(tuned, size, steps)
            )
        except BaseException as e:
            future.set_exception(e)  # what depends on it fails too, instead of waiting
            raise
        future.set_result(settings)
        runner.run_all([spec(plan, m, size, steps, seed, settings) for seed in range(plan.seeds)])

    with ThreadPoolExecutor(max_workers=len(best)) as threads:
        futures = [threads.submit(pipeline, *cell) for cell in best]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            runner.close()  # queued runs never start; the running ones finish and are cached
            raise
    settings: dict[str, dict[int, dict]] = {}
    for (size, steps, name), future in best.items():
        settings.setdefault(size, {}).setdefault(steps, {})[name] = future.result()
    return settings, [r for cell in best for r in tried[cell]]


def _cells(plan: Plan) -> list[Cell]:
    return [(size, h, m.name) for size in plan.sizes for h in plan.horizons for m in plan.methods]


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _aggregate(plan: Plan, runner: Runner, size: str, best: dict[int, dict]) -> list[dict]:
    """Seeds × horizons of every method's best setting at each horizon → one row per
    (horizon, method)."""
    rows = []
    for steps in plan.horizons:
        curves: dict[str, list[tuple[float, float]]] = {}
        for m in plan.methods:
            settings = best[steps][m.name]
            results = [
                runner.run(spec(plan, m, size, steps, seed, settings)) for seed in range(plan.seeds)
            ]
            finals = [r["final_val_loss"] for r in results if r["final_val_loss"] is not None]
            seed_curves = [[(t, v) for _, t, v in r["curve"]] for r in results if r["curve"]]
            curves[m.name] = mean_curve(seed_curves) if len(finals) == len(results) else []
            rows.append(
                {
                    "size": size,
                    "steps": steps,
                    "method": m.name,
                    "label": m.label,
                    "settings": settings,
                    "setting": settings_label(settings),
                    "seeds": len(results),
                    "ok_seeds": len(finals),
                    "final_val_loss_mean": statistics.fmean(finals) if finals else None,
                    "final_val_loss_std": _std(finals) if finals else None,
                    "tokens": max((r["tokens"] for r in results), default=0),
                    "wall_s_mean": statistics.fmean(r["wall_s"] for r in results),
                    "curve_mean": curves[m.name],
                    "keys": [r["key"] for r in results],
                }
            )
        for row in rows:
            if row["steps"] != steps:
                continue
            for column, base in BASELINES.items():
                if base not in curves or (base == "adamw_2x" and row["method"] not in DP_FAMILY):
                    row[column] = None
                    continue
                cf = compute_factor(curves[base], curves[row["method"]])
                bound = factor_bound(curves[base], curves[row["method"]]) if cf is None else None
                row[column] = {"factor": cf, "bound": bound, "text": format_factor(cf, bound)}
    return rows


def run_bench(plan: Plan, out: Path, command: str, probe: bool = True) -> dict[str, Any]:
    """Run (or read from the cache) the whole plan; write results.json, results.md, curves.png."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    announce(plan, out, probe)
    with Runner(out, plan.n_runs(), plan.jobs, plan.threads) as runner:
        best_all, tried = _run_protocol(plan, runner)
        rows = [
            row for size in plan.sizes for row in _aggregate(plan, runner, size, best_all[size])
        ]
    meta = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware(plan.base["run"]["device"]),
        "wall_s": time.perf_counter() - started,
        "jobs": plan.jobs,
        "threads": plan.threads,
        "executed": runner.executed,
        "reused": runner.reused,
        "runs_wall_s": sum(r["wall_s"] for r in runner.results.values()),
    }
    markdown = render_markdown(plan, rows, tried, meta)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    plot_curves(plan, rows, out / "curves.png")
    results = {
        "meta": meta,
        "plan": {
            "sizes": plan.sizes,
            "horizons": plan.horizons,
            "seeds": plan.seeds,
            "lr_grid": plan.lr_grid,
            "muon_lr_grid": plan.muon_lr_grid,
            "outer_grid": plan.outer_grid,
            "methods": [m.name for m in plan.methods],
            "skipped": plan.skipped,
            "evals": plan.evals,
            "warmup_frac": plan.warmup_frac,
            "base_config": plan.base,
        },
        "best": best_all,
        "table": rows,
        "runs": list(runner.results.values()),
    }
    text = json.dumps(_sanitize(results), indent=1, allow_nan=False)
    (out / "results.json").write_text(text + "\n", encoding="utf-8")
    print()
    print(markdown)
    print(f"outputs: {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}")
    return results


def _sanitize(obj: Any) -> Any:
    """JSON-safe copy: tuples become lists, non-finite floats become None."""
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --- command line --------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


#: (flag, add_argument keywords) of ``diloco bench optim``, in help order.
_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--quick", {"action": "store_true",
                 "help": "small plan: tiny model, 2 seeds, 100/250 steps, each tuned "
                         "(~8 min on 2 idle cores)"}),
    ("--config", {"help": "base YAML config (model, data, schedule, device); its model is the "
                  "size unless --sizes is given"}),
    ("--set", {"dest": "overrides", "action": "append", "default": [],
               "metavar": "SECTION.KEY=VALUE",
               "help": "override a base config value (repeatable)"}),
    ("--data", {"help": "corpus: embedded, text:PATH or bin:GLOB (default: the config's)"}),
    ("--out", {"help": "output and cache directory (default: bench_results/optim, with --quick "
               "bench_results/optim-quick)"}),
    ("--seeds", {"type": int, "help": "seeds per method's best setting (full: 3, quick: 2)"}),
    ("--sizes", {"nargs": "+", "help": "model sizes: tiny, small, config, or LxE (e.g. 6x256)"}),
    ("--steps", {"nargs": "+", "type": int,
                 "help": "horizons in steps; every method is tuned at each"}),
    ("--methods", {"nargs": "+", "help": f"subset of: {', '.join(BY_NAME)}"}),
    ("--lr-grid", {"type": _floats, "help": "LR grid of AdamW-inner methods, e.g. 1e-3,2e-3,4e-3"}),
    ("--muon-lr-grid", {"type": _floats, "help": "Muon LR grid of Muon-inner methods"}),
    ("--evals", {"type": int, "default": 16, "help": "evaluations per run (the curve's points)"}),
    ("--warmup-frac", {"type": float, "default": 0.1,
                       "help": "LR warm-up as a fraction of the horizon"}),
    ("--jobs", {"type": int, "help": "runs at once (default on CPU: cores / --threads; on a "
                "GPU: 1); a G=2 run takes two"}),
    ("--threads", {"type": int, "help": "torch threads per run and per G=2 rank (default "
                   "on CPU: 1, whatever --jobs, so that results do not depend on --jobs)"}),
    ("--plan", {"action": "store_true", "help": "print the plan and time estimate, run nothing"}),
    ("--tiny-test", {"action": "store_true", "help": argparse.SUPPRESS}),
)  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``diloco bench optim``."""
    for flag, kwargs in _OPTIONS:
        p.add_argument(flag, **kwargs)


def _command(args: argparse.Namespace) -> str:
    """The ``diloco bench optim ...`` command line that reproduces ``args``."""
    parts = ["diloco bench optim"]
    for flag, kwargs in _OPTIONS:
        value = getattr(args, kwargs.get("dest", flag[2:].replace("-", "_")))
        if value is None or value is False or value == kwargs.get("default") or value == []:
            continue
        if value is True:
            parts.append(flag)
        elif flag == "--set":
            parts += [f"--set {v}" for v in value]
        elif isinstance(value, list):
            sep = "," if flag.endswith("grid") else " "
            parts.append(
                f"{flag} " + sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            )
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def run_from_args(args: argparse.Namespace) -> int:
    """``diloco bench optim``."""
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps and min(args.steps) < 2:
        raise ConfigError(f"--steps must be >= 2, got {args.steps}")
    if args.evals < 1:
        raise ConfigError(f"--evals must be >= 1, got {args.evals}")
    if not 0 <= args.warmup_frac < 1:
        raise ConfigError(f"--warmup-frac must be in [0, 1), got {args.warmup_frac}")
    for flag in ("jobs", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {value}")
    plan = make_plan(args)
    plan.jobs, plan.threads = _parallelism(args, device_of(plan.base))
    out = Path(args.out or ("bench_results/optim-quick" if args.quick else "bench_results/optim"))
    with _torch_threads(plan.threads):  # the time probe runs in this process
        if args.plan:
            announce(plan, out, probe=not args.tiny_test)
        else:
            run_bench(plan, out, _command(args), probe=not args.tiny_test)
    return 0


def _parallelism(args: argparse.Namespace, device: str) -> tuple[int, int | None]:
    """(runs at once, torch threads per run) from ``--jobs`` / ``--threads`` and the machine.

    On CPU one thread per run and one run per core is fastest for these small models (on 2
    cores: 2 runs at 1 thread make 2.0x the steps of 1 run at 1 thread, 1 run at 2 threads
    1.5x); on a GPU the runs take turns on it. The threads per run default to 1 whatever
    ``--jobs`` is: a CPU reduction (a norm, a sum) splits its work by thread, so its float
    rounding, and with it every later step, depends on the thread count, never on ``--jobs``.
    """
    if device == "cuda":
        if args.jobs not in (None, 1):
            raise ConfigError(
                f"--jobs {args.jobs}: the runs take turns on the GPU; use --jobs 1 (the default)"
            )
        return 1, args.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    threads = args.threads or 1
    if args.jobs:
        return args.jobs, threads
    return max(1, cores // threads), threads


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run in-process trainings with ``n`` torch threads (``train`` honours OMP_NUM_THREADS)."""
    import torch

    if not n:
        yield
        return
    saved_env, saved_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        if saved_env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env
