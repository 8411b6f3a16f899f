"""Benchmark: what the outer loop costs next to the inner steps, per (G groups × S shards) layout.

Runs the same model and data for each layout under torchrun on this machine (gloo on the CPU by
default), plus an ``outer.method: none`` job at G = 1 with the same S for the memory baseline,
then prints a table and writes JSON. Per layout:

* inner step (ms): mean wall time of an inner step (forward, backward, clip, inner update;
  with S > 1 that includes FSDP2's all-gathers and reduce-scatter), mean over ranks;
* outer step (ms) and its parts, median over rounds then mean over ranks: forming Δ in place,
  the reduce (the all-reduce over groups), and the outer update + restart of the fast weights;
  and outer step ÷ inner step. With G > 1 the worker puts a barrier before each outer step so
  that the reduce time is the collective itself; the time spent in that barrier (waiting for
  the slowest group: load imbalance, not communication) is reported separately as "wait";
* bytes per round per rank for the pseudo-gradient (the reducer's ``bytes_sent``:
  2(G−1)/G · 4 · P/S for a ring all-reduce in fp32) next to what data parallel over the same
  W = G·S ranks would send in the same K steps: K · 2(W−1)/W · P · 4 (gradient all-reduce every
  step). FSDP2's traffic inside a group is not in either number;
* peak memory per rank (max over ranks): host RSS and its increase over the ``none`` job with
  the same S (same shard size and per-rank batch), the outer state itself (θ + b =
  2 · 4 · P/S bytes), and on CUDA the peak GPU memory allocated by tensors (``--set
  run.device=cuda``; "–" on the CPU).

    python -m diloco.bench.distributed                  # G ∈ {1,2} × S ∈ {1,2}, 64 steps, K=16
    python -m diloco.bench.distributed --layouts 2x2 --steps 128 --set model.n_embd=256

Timings are whatever this machine gives (on a 2-core CPU, 4 ranks share 2 cores); nothing is
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from diloco.launchers.local import child_env, torchrun_cmd

BASE = [
    "run.device=cpu",
    "run.progress=false",
    "topology.backend=gloo",
    "topology.mixed_precision=fp32",
    "inner.warmup_steps=8",
    "train.eval_every=0",
    "train.eval_batches=2",
    "outer.momentum=0.9",
]


def _worker(out: Path, overrides: list[str]) -> None:
    """Under torchrun: train, recording every rank's SyncReports and summary in rank<r>.json."""
    import torch.distributed

    from diloco.algorithm.wrapper import DiLoCo
    from diloco.config import load_config
    from diloco.job.metrics import peak_rss_mb
    from diloco.job.train import train

    reports = []
    sync = DiLoCo.sync

    def recording_sync(self):
        # Wait for the slowest rank first, so reduce_s is the collective, not the skew.
        t0 = time.perf_counter()
        if self.reducer.groups > 1:
            torch.distributed.barrier()
        wait = time.perf_counter() - t0
        report = sync(self)
        if report is not None:
            reports.append({**asdict(report), "wait_s": wait})
        return report

    DiLoCo.sync = recording_sync
    summary = train(load_config(None, overrides))
    rank = int(os.environ.get("RANK", "0"))
    record = {"summary": summary, "rounds": reports, "peak_rss_mb": peak_rss_mb()}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def _launch(out: Path, groups: int, shards: int, overrides: list[str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    world = groups * shards
    sets = [*overrides, f"run.out_dir={out}", f"topology.groups={groups}",
            f"topology.shards={shards}"]  # fmt: skip
    cmd = torchrun_cmd(world, "-m", "diloco.bench.distributed", "--worker", str(out), "--", *sets)
    env = child_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{groups}x{shards} failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _param_count(overrides: list[str]) -> int:
    from diloco.config import load_config
    from diloco.models import GPT, GPTConfig

    m = load_config(None, overrides).model
    model = GPT(GPTConfig(m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd))
    return model.num_params()


def _ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values) if values else 0.0


def _row(groups: int, shards: int, ranks: list[dict], base: list[dict], P: int, K: int) -> dict:
    world = groups * shards
    mean = statistics.fmean
    parts = {
        key: mean(_ms([r[key] for r in rank["rounds"]]) for rank in ranks)
        for key in ("delta_s", "reduce_s", "outer_s", "wait_s")
    }
    inner_ms = mean(rank["summary"]["inner_step_ms"] for rank in ranks)
    outer_ms = parts["delta_s"] + parts["reduce_s"] + parts["outer_s"]
    sent = [r["reducer"].get("bytes_sent", 0.0) for r in ranks[0]["rounds"]]
    peak = max(rank["peak_rss_mb"] for rank in ranks)
    base_peak = max(rank["peak_rss_mb"] for rank in base)
    return {
        "layout": f"{groups}x{shards}",
        "groups": groups,
        "shards": shards,
        "params": P,
        "inner_step_ms": inner_ms,
        "outer_step_ms": outer_ms,
        "delta_ms": parts["delta_s"],
        "reduce_ms": parts["reduce_s"],
        "update_ms": parts["outer_s"],
        "wait_ms": parts["wait_s"],
        "outer_over_inner": outer_ms / inner_ms if inner_ms else 0.0,
        "bytes_per_round_per_rank": max(sent) if sent else 0.0,
        "dp_bytes_per_K_steps_per_rank": K * 2 * (world - 1) / world * P * 4,
        "outer_state_mb_per_rank": 2 * 4 * P / shards / 2**20,
        "peak_rss_mb_per_rank": peak,
        "peak_rss_mb_none": base_peak,
        "peak_rss_delta_mb": peak - base_peak,
        "peak_gpu_mb_per_rank": max(rank["summary"].get("gpu_mem_alloc_mb", 0.0) for rank in ranks),
        "final_val_loss": ranks[0]["summary"]["final_val_loss"],
    }


def _table(rows: list[dict]) -> str:
    head = (
        "| G×S | inner ms | outer ms (Δ / reduce / update+restart) | wait ms | outer÷inner "
        "| bytes/round/rank | DP bytes per K steps | peak RSS MB/rank (none) | Δ RSS MB "
        "| outer state MB/rank | peak GPU MB/rank |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        gpu = f"{r['peak_gpu_mb_per_rank']:.0f}" if r["peak_gpu_mb_per_rank"] else "–"
        lines.append(
            f"| {r['layout']} | {r['inner_step_ms']:.1f} | {r['outer_step_ms']:.1f} "
            f"({r['delta_ms']:.1f} / {r['reduce_ms']:.1f} / {r['update_ms']:.1f}) | "
            f"{r['wait_ms']:.1f} | "
            f"{r['outer_over_inner']:.3f} | {r['bytes_per_round_per_rank'] / 1e6:.2f} MB | "
            f"{r['dp_bytes_per_K_steps_per_rank'] / 1e6:.1f} MB | "
            f"{r['peak_rss_mb_per_rank']:.0f} ({r['peak_rss_mb_none']:.0f}) | "
            f"{r['peak_rss_delta_mb']:+.1f} | {r['outer_state_mb_per_rank']:.1f} | {gpu} |"
        )
    return "\n".join(lines)


def main() -> None:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        rest = sys.argv[i + 2 :]
        _worker(Path(sys.argv[i + 1]), rest[1:] if rest[:1] == ["--"] else rest)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", default="1x1,1x2,2x1,2x2", help="GxS,... (default: %(default)s)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--sync-every", type=int, default=16, help="K")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/bench_distributed", help="run dirs and results.json")
    args = p.parse_args()
    out = Path(args.out)
    K = args.sync_every
    common = [*BASE, f"train.steps={args.steps}", f"outer.sync_every={K}",
              f"train.log_every={K}", *args.overrides]  # fmt: skip
    P = _param_count(common)
    layouts = [tuple(int(n) for n in s.split("x")) for s in args.layouts.split(",")]
    baselines: dict[int, list[dict]] = {}
    rows = []
    for G, S in layouts:
        if S not in baselines:
            t0 = time.perf_counter()
            baselines[S] = _launch(out / f"none_1x{S}", 1, S, [*common, "outer.method=none"])
            print(f"none 1x{S}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        t0 = time.perf_counter()
        ranks = _launch(out / f"diloco_{G}x{S}", G, S, common)
        print(f"diloco {G}x{S}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows.append(_row(G, S, ranks, baselines[S], P, K))
    import torch

    meta = {
        "steps": args.steps,
        "sync_every": K,
        "params": P,
        "overrides": common,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    print(f"P = {P:,} parameters, {args.steps} steps, K = {K}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, gloo")  # fmt: skip
    print(_table(rows))
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
