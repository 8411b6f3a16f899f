"""Specification of distributed DiLoCo: G worker groups × S FSDP2 shards under torchrun (gloo).

Every test here runs real processes (``python -m torch.distributed.run``) on the CPU. The
reference for G groups is written in this file from docs/design.md §1, independently of the wrapper,
reducer and training loop: the groups' inner loops run one after the other in one process, each
with its own inner AdamW state and its own data stream, and their pseudo-gradients are averaged
before the outer step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import run_torchrun, run_torchrun_script, tiny_overrides

from diloco.config import load_config
from diloco.job.data import BatchStream, eval_batches, load_corpus
from diloco.job.inner import build_inner_optimizer, build_scheduler
from diloco.job.metrics import read_metrics
from diloco.job.train import build_model, train
from diloco.launchers.local import child_env

pytestmark = pytest.mark.slow

STEPS, K = 24, 4
TINY = tiny_overrides(
    STEPS,
    K,
    "train.eval_every=10",  # mid-round evaluations: θ is swapped into sharded fast weights
    "train.log_every=4",
    "train.check_every=2",
)
# The EMA-Nesterov run also keeps θ and m in host memory (outer.offload=cpu), so the staging copy
# through which the reducer sees the pseudo-gradient is covered on the sharded path too.
EMA = ["outer.method=ema_nesterov", "outer.lr=0.9", "outer.offload=cpu"]
BF16 = "topology.mixed_precision=bf16"
LAUNCH_TIMEOUT_S = 240


#: The default model (4 layers, width 128, block 128, batch 16), two groups, on settings where
#: fp32 layouts drift apart by amplified roundoff (docs/distributed.md): clipping engages on
#: the warm-up steps and on a loss spike at step 16. In fp64 the layouts must agree.
DEFAULT_MODEL_FP64 = [
    "train.steps=32",
    "inner.warmup_steps=4",
    "outer.sync_every=8",
    "train.eval_every=16",
    "train.log_every=1",
    "run.device=cpu",
    "run.progress=false",
    "topology.backend=gloo",
    "topology.mixed_precision=fp64",
    "topology.groups=2",
]


def torchrun(
    out_dir: Path,
    nproc: int,
    overrides: list[str],
    timeout: float = LAUNCH_TIMEOUT_S,
    base: list[str] = TINY,
) -> subprocess.CompletedProcess:
    """``torchrun -m diloco train`` of ``base`` (TINY) + ``overrides`` in ``out_dir``."""
    return run_torchrun(nproc, [*base, f"run.out_dir={out_dir}", *overrides], timeout=timeout)


# The torchrun jobs the tests compare: name -> (processes, overrides[, base settings]).
LAUNCHES = {
    "default_g2s2_fp64": (4, ["topology.shards=2"], DEFAULT_MODEL_FP64),
    "default_g2s1_fp64": (2, [], DEFAULT_MODEL_FP64),
    "g2s2": (4, ["topology.groups=2", "topology.shards=2"]),
    "g2s2_ema": (4, ["topology.groups=2", "topology.shards=2", *EMA]),
    "g2s1": (2, ["topology.groups=2"]),
    "g1s2": (2, ["topology.shards=2"]),
    "g1s1": (1, []),
    "g2s2_bf16": (4, ["topology.groups=2", "topology.shards=2", BF16]),
    "g2s1_bf16": (2, ["topology.groups=2", BF16]),
    "g1s2_bf16": (2, ["topology.shards=2", BF16]),
}


class Runs:
    """Starts every job of LAUNCHES (a few at a time) and hands back their run directories.

    The jobs spend much of their time importing torch and waiting on each other, so running
    some side by side shortens the module's wall time; their results do not depend on timing.
    """

    def __init__(self, root: Path, pool: ThreadPoolExecutor):
        self.root = root
        self._done: dict[str, Path] = {}
        self._jobs = {name: pool.submit(self._launch, name, *job) for name, job in LAUNCHES.items()}

    def _launch(self, name: str, nproc: int, overrides: list[str], base: list[str] = TINY) -> Path:
        result = torchrun(self.root / name, nproc, overrides, base=base)
        assert result.returncode == 0, f"{name} failed:\n{result.stderr[-4000:]}"
        return self.root / name

    def get(self, name: str) -> Path:
        return self._jobs[name].result()

    def single_process(self, name: str, overrides: list[str]) -> Path:
        """The plain single-process SNOO job (no process group), in this process, one thread."""
        if name not in self._done:
            out = self.root / name
            threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)
            try:
                train(load_config(None, [*TINY, f"run.out_dir={out}", *overrides]))
            finally:
                torch.set_num_threads(threads)
                if omp is None:
                    del os.environ["OMP_NUM_THREADS"]
                else:
                    os.environ["OMP_NUM_THREADS"] = omp
            self._done[name] = out
        return self._done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[Runs]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield Runs(tmp_path_factory.mktemp("dist"), pool)


def final_theta(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "final_model.pt", map_location="cpu")


def curves(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, val loss by step) from metrics.jsonl."""
    records = read_metrics(run / "metrics.jsonl")
    loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    return loss, val


def assert_runs_match(a: Path, b: Path, atol: float, rtol: float = 0.0) -> None:
    loss_a, val_a = curves(a)
    loss_b, val_b = curves(b)
    assert loss_a.keys() == loss_b.keys() and val_a.keys() == val_b.keys()
    for step in loss_a:
        assert math.isclose(loss_a[step], loss_b[step], rel_tol=rtol, abs_tol=atol), step
    for step in val_a:
        assert math.isclose(val_a[step], val_b[step], rel_tol=rtol, abs_tol=atol), step
    theta_a, theta_b = final_theta(a), final_theta(b)
    assert theta_a.keys() == theta_b.keys()
    for k in theta_a:
        torch.testing.assert_close(theta_a[k], theta_b[k], atol=atol, rtol=rtol, msg=k)


# --------------------------------------------------------------------------------------------
# reference: G groups in one process, straight from docs/design.md §1


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def reference(groups: int, overrides: list[str] = ()) -> dict:
    """Losses, val losses, per-round stats and final θ of DiLoCo with ``groups`` groups."""
    cfg = load_config(None, [*TINY, *overrides])
    i, o, T, B = cfg.inner, cfg.outer, cfg.model.block_size, cfg.data.batch_size
    corpus = load_corpus(cfg.data.source, T)
    init = build_model(cfg, corpus.vocab_size)
    names = [n for n, _ in init.named_parameters()]
    theta = [p.detach().clone() for p in init.parameters()]
    start = [t.clone() for t in theta]  # s_t
    buf = [torch.zeros_like(t) for t in theta]  # b (nesterov) or m (ema_nesterov)
    models = [copy.deepcopy(init) for _ in range(groups)]
    inner = [
        build_inner_optimizer(
            m, i.optimizer, lr=i.lr, weight_decay=i.weight_decay, betas=i.betas, eps=i.eps
        )
        for m in models
    ]
    schedules = [
        build_scheduler(opt, STEPS, warmup_steps=i.warmup_steps, schedule=i.schedule,
                        min_lr_ratio=i.min_lr_ratio, decay_frac=i.decay_frac)
        for opt in inner
    ]  # fmt: skip
    streams = [BatchStream(corpus.train, B, T, cfg.run.seed, stream=g) for g in range(groups)]
    val_batches = eval_batches(corpus.val, B, T, cfg.train.eval_batches)
    evaluator = copy.deepcopy(init).eval()

    @torch.no_grad()
    def val_loss(weights: list[torch.Tensor]) -> float:
        for p, w in zip(evaluator.parameters(), weights, strict=True):
            p.copy_(w)
        return sum(float(evaluator(x, y)[1]) for x, y in val_batches) / len(val_batches)

    out: dict = {"loss": {}, "val": {0: val_loss(theta)}, "rounds": {}}
    warmup, rest = int(o.ema_warmup * STEPS), int(o.ema_rest * STEPS)
    for step in range(1, STEPS + 1):
        losses = []
        for g in range(groups):
            x, y = streams[g].next()
            _, loss = models[g](x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[g].parameters(), i.grad_clip)
            inner[g].step()
            inner[g].zero_grad()
            losses.append(float(loss.detach()))
        out["loss"][step] = sum(losses) / groups
        if step % K == 0 or step == STEPS:
            with torch.no_grad():
                # Δ_g = s − φ_g;  Δ = mean_g Δ_g
                deltas = [[s - p for s, p in zip(start, m.parameters(), strict=True)]
                          for m in models]  # fmt: skip
                delta = [sum(d[j] for d in deltas) / groups for j in range(len(theta))]
                flat = [torch.cat([t.flatten() for t in d]).double() for d in deltas]
                mean = torch.cat([t.flatten() for t in delta]).double()
                out["rounds"][step] = {
                    "pseudo_grad_norm": float(mean.norm()),
                    "group_cosine": sum(cosine(f, mean) for f in flat) / groups,
                    "pairwise_cosine": cosine(flat[0], flat[-1]),
                }
                if o.method == "nesterov":  # b ← μb + Δ;  θ ← θ − η(Δ + μb);  s = θ
                    buf = [o.momentum * b + d for b, d in zip(buf, delta, strict=True)]
                    theta = [t - o.lr * (d + o.momentum * b)
                             for t, d, b in zip(theta, delta, buf, strict=True)]  # fmt: skip
                    start = [t.clone() for t in theta]
                else:  # θ' = s − ηΔ;  m ← γm + (1−γ)(θ' − θ);  s' = θ' + β'm
                    new = [s - o.lr * d for s, d in zip(start, delta, strict=True)]
                    buf = [o.ema_gamma * m + (1 - o.ema_gamma) * (n - t)
                           for m, n, t in zip(buf, new, theta, strict=True)]  # fmt: skip
                    theta = new
                    group0 = inner[0].param_groups[0]
                    beta = o.ema_beta * group0["lr"] / group0["initial_lr"]
                    if step < warmup or step >= STEPS - rest:
                        beta = 0.0
                    start = [t + beta * m for t, m in zip(theta, buf, strict=True)]
                for m in models:
                    for p, s in zip(m.parameters(), start, strict=True):
                        p.copy_(s)
        for sched in schedules:
            sched.step()
        if step % cfg.train.eval_every == 0 or step == STEPS:
            out["val"][step] = val_loss(theta)
    out["theta"] = dict(zip(names, theta, strict=True))
    return out


def assert_matches_reference(run: Path, ref: dict, atol: float) -> None:
    loss, val = curves(run)
    for step, value in loss.items():
        assert math.isclose(value, ref["loss"][step], abs_tol=atol), (step, value)
    for step, value in val.items():
        assert math.isclose(value, ref["val"][step], abs_tol=atol), (step, value)
    assert set(val) == {0, 10, 20, STEPS}
    theta = final_theta(run)
    for name, t in ref["theta"].items():
        torch.testing.assert_close(theta[name], t, atol=atol, rtol=0, msg=name)
    for record in read_metrics(run / "metrics.jsonl"):
        if "pseudo_grad_norm" in record:
            expect = ref["rounds"][record["step"]]
            for key in ("pseudo_grad_norm", "group_cosine", "pairwise_cosine"):
                assert math.isclose(record[key], expect[key], rel_tol=1e-4), (key, record["step"])


# --------------------------------------------------------------------------------------------
# the specification


def clipped_steps(run: Path, max_norm: float = 1.0) -> tuple[int, int]:
    """(logged steps whose gradient norm before clipping exceeded ``inner.grad_clip``, logged
    steps): how much of a comparison covers the clipped path (a global norm over the shards of
    a group)."""
    norms = [r["grad_norm"] for r in read_metrics(run / "metrics.jsonl") if "grad_norm" in r]
    return sum(n > max_norm for n in norms), len(norms)


def assert_clipping_engaged(run: Path) -> None:
    """Every logged step's gradients were clipped."""
    clipped, logged = clipped_steps(run)
    assert logged >= STEPS // 4 and clipped == logged, (clipped, logged)


def test_sharded_groups_equal_unsharded_groups(runs):
    """G=2 × S=2 (FSDP2, each group batch split over 2 ranks) == G=2 × S=1 (same group batch),
    with every step's gradients clipped."""
    for run in ("g2s2", "g2s1"):
        assert_clipping_engaged(runs.get(run))
    assert_runs_match(runs.get("g2s2"), runs.get("g2s1"), atol=2e-6, rtol=1e-6)


def test_sharded_groups_equal_unsharded_groups_on_the_default_model_in_fp64(runs):
    """The default model, G=2 × S=2 vs G=2 × S=1 in float64, clipping engaged: the same maths
    to 1e-9 in every loss and in θ (measured: 1e-11). In fp32 the same pair ends 3e-4 to 2.5e-3
    apart after 48 steps, about as far as an fp32 run is from itself with 2 threads per rank
    instead of 1: roundoff amplified by the loss spike, not a sharding error."""
    sharded, unsharded = runs.get("default_g2s2_fp64"), runs.get("default_g2s1_fp64")
    for run in (sharded, unsharded):
        clipped, logged = clipped_steps(run)
        assert logged == 32 and clipped >= 8, (clipped, logged)
    assert_runs_match(sharded, unsharded, atol=1e-9)
    theta = final_theta(unsharded)
    assert theta["wte.weight"].dtype == torch.float64
    del theta["lm_head.weight"]  # tied to wte.weight: one parameter
    params = sum(t.numel() for t in theta.values())
    rounds = [r for r in read_metrics(unsharded / "metrics.jsonl") if "bytes_sent" in r]
    assert [r["bytes_sent"] for r in rounds] == [2 * (2 - 1) / 2 * params * 8] * 4  # fp64 Δ


#: bf16 runs must agree to 5e-3 in (fp32) loss: less than the rounding of a loss of about 3.5 to
#: bf16 itself (2^-9 · 3.5 ≈ 7e-3), so a loss computed in bf16 fails it (S=2 did: 3.3e-2), while
#: the bf16 rounding of weights and activations, averaged over a batch's tokens, stays below it
#: (2.1e-3 measured). S=1 computes under autocast, S=2 with FSDP2's bf16 parameters.
BF16_ATOL = 5e-3


def assert_curves_close(a: Path, b: Path, atol: float) -> float:
    """Train and val losses of ``a`` and ``b`` agree to ``atol``; returns the largest gap."""
    (loss_a, val_a), (loss_b, val_b) = curves(a), curves(b)
    assert loss_a.keys() == loss_b.keys() and val_a.keys() == val_b.keys()
    gaps = [abs(x[k] - y[k]) for x, y in ((loss_a, loss_b), (val_a, val_b)) for k in x]
    assert max(gaps) <= atol, max(gaps)
    return max(gaps)


@pytest.mark.parametrize("sharded, unsharded", [("g1s2_bf16", None), ("g2s2_bf16", "g2s1_bf16")])
def test_bf16_sharded_runs_equal_unsharded_runs_within_bf16_rounding(runs, sharded, unsharded):
    """bf16 on the CPU: S=2 (FSDP2 mixed precision) vs S=1 (autocast), for one group (against
    the single-process run) and for two; the loss is computed in fp32 on both paths."""
    other = runs.single_process("snoo_bf16", [BF16]) if unsharded is None else runs.get(unsharded)
    assert_curves_close(runs.get(sharded), other, atol=BF16_ATOL)
    fp32 = runs.get(sharded.removesuffix("_bf16"))
    assert assert_curves_close(runs.get(sharded), fp32, atol=1.0) > 1e-4  # bf16 really ran


@pytest.mark.parametrize("shards", [1, 2])
def test_one_group_under_torchrun_equals_single_process_snoo(runs, shards):
    single = runs.single_process("snoo", [])
    assert_runs_match(runs.get(f"g1s{shards}"), single, atol=1e-6 if shards > 1 else 0.0)


@pytest.mark.parametrize(
    "run, method", [("g2s2", []), ("g2s2_ema", EMA)], ids=["nesterov", "ema_nesterov"]
)
def test_two_sharded_groups_equal_the_reference(runs, run, method):
    """G=2 × S=2 equals two groups' inner loops run one after the other, Δ averaged (§1)."""
    assert_matches_reference(runs.get(run), reference(2, method), atol=1e-5)


def test_round_metrics_report_traffic_and_agreement(runs):
    """bytes_sent = 2(G−1)/G · (rank 0's shard of θ) · 4; θ checksums logged; G=1 sends nothing."""
    records = read_metrics(runs.get("g2s2") / "metrics.jsonl")
    theta = final_theta(runs.get("g2s2"))
    del theta["lm_head.weight"]  # tied to wte.weight: one parameter
    shard0 = sum(math.ceil(t.shape[0] / 2) * t[0].numel() for t in theta.values())
    rounds = [r for r in records if "pseudo_grad_norm" in r]
    assert len(rounds) == STEPS // K
    for r in rounds:
        assert r["bytes_sent"] == 2 * (2 - 1) / 2 * shard0 * 4
        assert r["buckets"] == 1
        assert -1 <= r["pairwise_cosine"] <= r["group_cosine"] <= 1
        assert r["reduce_s"] >= 0 and r["outer_s"] >= 0
    assert "theta_sumsq" in records[0]  # checked before the first step
    assert sum("theta_sumsq" in r for r in records) == 1 + STEPS // K // 2  # check_every=2
    summary = json.loads((runs.get("g2s2") / "summary.json").read_text())
    assert (summary["groups"], summary["shards"]) == (2, 2)
    one_group = read_metrics(runs.get("g1s2") / "metrics.jsonl")
    assert not any("bytes_sent" in r or "theta_sumsq" in r for r in one_group)


@pytest.mark.parametrize(
    "nproc, overrides, message",
    [
        (3, ["topology.groups=2", "topology.shards=2"], "world size 3 != topology.groups"),
        (2, ["topology.shards=2", "data.batch_size=7"], "data.batch_size (7) must be divisible"),
    ],
    ids=["world_not_G_times_S", "batch_not_divisible_by_S"],
)
def test_bad_topology_fails_on_every_rank_with_one_line(tmp_path, nproc, overrides, message):
    result = torchrun(tmp_path / "bad", nproc, overrides, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("diloco: error:")]
    assert len(errors) == nproc, result.stderr[-3000:]
    assert all(message in line for line in errors), errors


SLOW_RANK = textwrap.dedent(
    """
    # Run by torchrun: rank 1 starts 8 s late; then every rank fails on the same config error.
    import os, sys, time
    if os.environ["RANK"] == "1":
        time.sleep(8)
    from diloco.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_late_rank_still_reports_its_error_before_the_job_stops(tmp_path):
    """The first failing rank waits until every rank of its node has written its line (not a
    fixed grace: a rank 8 s late still gets its say) before torchrun stops the others."""
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK)
    bad = ["--set", "topology.shards=2", "--set", "data.batch_size=7"]
    result = run_torchrun_script(2, script, "train", *bad, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("diloco: error:")]
    assert len(errors) == 2, result.stderr[-3000:]


WRITER = textwrap.dedent(
    """
    # Run with PYTHONUNBUFFERED=1, its stderr shared with other writers: says it is ready on
    # stdout, waits for the go on stdin, then writes its warnings.
    import sys
    from diloco.errors import warn
    print("ready", flush=True)
    sys.stdin.read(1)
    for i in range(int(sys.argv[2])):
        warn(f"writer {sys.argv[1]} line {i} " + "x" * 40)
    """
)


def test_message_lines_of_processes_sharing_stderr_never_merge(tmp_path):
    """Each message line is written with one write: 6 unbuffered processes writing 2000
    warnings each into one pipe at once give 12000 whole lines (``print`` writes the text and
    the newline apart: hundreds of merged lines)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    read, write = os.pipe()
    env = child_env({"PYTHONUNBUFFERED": "1"})
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), str(w), "2000"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=write, env=env, text=True,
        )
        for w in range(6)
    ]  # fmt: skip
    os.close(write)
    assert [w.stdout.readline() for w in writers] == ["ready\n"] * 6
    for w in writers:  # all at once
        w.stdin.write("go")
        w.stdin.close()
    with os.fdopen(read, encoding="utf-8") as pipe:
        lines = pipe.read().splitlines()
    assert [w.wait(60) for w in writers] == [0] * 6
    whole = re.compile(r"diloco: warning: writer \d line \d+ x{40}")
    merged = [line for line in lines if not whole.fullmatch(line)]
    assert len(lines) == 12000 and not merged, (len(merged), merged[:3])


REDUCER_CHECKS = textwrap.dedent(
    """
    # Run by torchrun with 2 ranks: checks of MeshReducer and Runtime on a (2, 1) mesh.
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from diloco.config import TopologyConfig
    from diloco.errors import TopologyError
    from diloco.comm.mesh import MeshReducer
    from diloco.comm.topology import init_runtime

    rt = init_runtime(TopologyConfig(groups=2, shards=1, backend="gloo"), "cpu")
    g = rt.group
    torch.manual_seed(0)
    base = [torch.randn(5, 3), torch.randn(7), torch.randn(40)]  # identical on both ranks
    own = [t * (1 + g) + g * torch.roll(t, 1) for t in base]  # this group's Δ_g
    reducer = MeshReducer(rt.mesh, bucket_mb=30 * 4 / 2**20)  # buckets of <= 30 floats
    tensors = [t.clone() for t in own]
    stats = reducer.average(tensors)
    out = {"avg": [t.tolist() for t in tensors], "stats": stats, "mean": rt.mean(float(g))}
    out["agree"] = rt.check_groups_agree(base)
    try:
        rt.check_groups_agree(own)
    except TopologyError as e:
        out["mismatch"] = str(e)

    # A (1, 2) mesh: one group, two shards: average sends nothing, sum_over_shards sums.
    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or all_reduce(*a, **k)
    snoo = MeshReducer(init_device_mesh("cpu", (1, 2), mesh_dim_names=("group", "shard")))
    out["snoo_stats"] = snoo.average([t.clone() for t in own])
    out["snoo_calls"] = len(calls)
    out["shard_sum"] = float(snoo.sum_over_shards(torch.tensor(1.0 + g, dtype=torch.float64)))
    out["shard_calls"] = len(calls)
    rank = dist.get_rank()
    del reducer, snoo  # nothing may hold a process group past close()
    rt.close()
    out["after_close"] = [dist.is_initialized(), rt.mesh is None, type(rt.reducer).__name__]
    json.dump(out, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
    """
)


def test_mesh_reducer_averages_buckets_and_reports_exact_stats(tmp_path):
    script = tmp_path / "reducer_checks.py"
    script.write_text(REDUCER_CHECKS)
    result = run_torchrun_script(2, script, str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    torch.manual_seed(0)
    base = [torch.randn(5, 3), torch.randn(7), torch.randn(40)]
    own = [[t * (1 + g) + g * torch.roll(t, 1) for t in base] for g in (0, 1)]
    mean = [(a + b) / 2 for a, b in zip(*own, strict=True)]
    flat = [torch.cat([t.flatten() for t in d]).double() for d in own]
    flat_mean = torch.cat([t.flatten() for t in mean]).double()
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for got, want in zip(out["avg"], mean, strict=True):
            torch.testing.assert_close(torch.tensor(got), want)
        stats = out["stats"]
        assert stats["bytes_sent"] == 2 * (2 - 1) / 2 * 62 * 4  # 62 floats, ring all-reduce
        assert stats["buckets"] == 2  # [15 + 7], [40]
        group_cosine = (cosine(flat[0], flat_mean) + cosine(flat[1], flat_mean)) / 2
        assert math.isclose(stats["group_cosine"], group_cosine, rel_tol=1e-6)
        assert math.isclose(stats["pairwise_cosine"], cosine(flat[0], flat[1]), rel_tol=1e-5)
        assert out["mean"] == 0.5
        total = sum(float(t.double().sum()) for t in base)
        assert all(math.isclose(s, total, rel_tol=1e-9) for s, _ in out["agree"])
        assert out["mismatch"].startswith("group 1 weights differ from group 0's")
        assert out["snoo_stats"] == {} and out["snoo_calls"] == 0
        assert out["shard_sum"] == 3.0 and out["shard_calls"] == 1
        assert out["after_close"] == [False, True, "SingleGroup"]  # groups torn down and freed
