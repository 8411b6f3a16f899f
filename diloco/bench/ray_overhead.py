"""Benchmark: what ``diloco launch ray`` costs next to ``torchrun`` on the same config.

Runs the same job under torchrun and under ``diloco launch ray --address local`` (a private
Ray on this machine), one after the other, with and without a checkpoint every round, then
prints a table and writes JSON. Per run:

* total (s): the launch command's wall time, start to exit;
* loop (s): the training loop's own wall time (``summary.json`` ``wall_s``: first step to the
  last, with evaluations, checkpoints and, under Ray, every ``ray.train.report``);
* per round (ms): loop ÷ rounds, and its difference to torchrun's (the per-round overhead of
  Ray: one ``report`` barrier per log step, plus the copy of each reported checkpoint);
* start-up (s): total − loop (process start, imports, rendezvous, model build; under Ray also
  ``ray.init``, the Train controller and the worker group, and the shutdown); for Ray split
  into ``ray.init`` and ``fit() → worker function`` (the time from the driver calling ``fit()``
  to the first worker printing its placement line).

    python -m diloco.bench.ray_overhead                       # G=2 × S=1 tiny GPT, 64 steps, K=4
    python -m diloco.bench.ray_overhead --set topology.shards=2 --steps 32

Timings are whatever this machine gives (load average printed); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from diloco.launchers.local import REPO, child_env, torchrun_cmd

TINY = [
    "model.n_layer=2",
    "model.n_embd=32",
    "model.block_size=32",
    "data.batch_size=8",
    "train.eval_every=0",
    "train.eval_batches=2",
    "inner.warmup_steps=4",
    "run.device=cpu",
    "run.progress=false",
    "topology.backend=gloo",
    "topology.mixed_precision=fp32",
    "topology.groups=2",
]


def _run(cmd: list[str]) -> tuple[float, dict[str, float], str]:
    """Run ``cmd``; returns (wall s, {marker: seconds after start of its first stderr line})."""
    env = child_env()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    seen: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            for marker in ("diloco: Ray run ", "diloco: node "):
                if marker in line and marker not in seen:
                    seen[marker] = time.perf_counter() - t0

    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait()
    reader.join()
    wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"{' '.join(cmd[:6])} … failed ({code}):\n{''.join(lines)[-4000:]}")
    return wall, seen, "".join(lines)


def measure(launcher: str, out: Path, overrides: list[str], nproc: int) -> dict[str, float]:
    sets = [a for o in [*overrides, f"run.out_dir={out}"] for a in ("--set", o)]
    if launcher == "torchrun":
        cmd = torchrun_cmd(nproc, "-m", "diloco", "train", *sets)
    else:
        cmd = [sys.executable, "-m", "diloco", "launch", "ray", *sets, "--address", "local"]
    wall, seen, log = _run(cmd)
    (out / "launch.log").write_text(log)
    summary = json.loads((out / "summary.json").read_text())
    rounds = summary["steps"] // int(next(o for o in overrides if "sync_every" in o).split("=")[1])
    row = {
        "total_s": wall,
        "loop_s": summary["wall_s"],
        "per_round_ms": 1e3 * summary["wall_s"] / rounds,
        "startup_s": wall - summary["wall_s"],
        "final_val_loss": summary["final_val_loss"],
    }
    if launcher == "ray":
        row["ray_init_s"] = summary["ray_init_s"]
        row["ray_fit_s"] = summary["ray_fit_s"]
        if "diloco: Ray run " in seen and "diloco: node " in seen:
            row["fit_to_worker_s"] = seen["diloco: node "] - seen["diloco: Ray run "]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_ray")
    args = parser.parse_args()
    base = [
        *TINY,
        f"train.steps={args.steps}",
        f"outer.sync_every={args.sync_every}",
        f"train.log_every={args.sync_every}",  # one metrics record (one Ray report) per round
        *args.overrides,
    ]
    from diloco.config import load_config

    cfg = load_config(None, base)
    nproc = cfg.topology.groups * cfg.topology.shards
    results = {"load_average_before": os.getloadavg(), "config": base, "runs": {}}
    for ckpt in (0, 1):
        overrides = [*base, f"train.checkpoint_every={ckpt}"]
        for launcher in ("torchrun", "ray"):
            name = f"{launcher}_ckpt{ckpt}"
            out = args.out / name
            if out.exists():
                import shutil

                shutil.rmtree(out)
            results["runs"][name] = measure(launcher, out, overrides, nproc)
            print(f"{name}: {results['runs'][name]}", file=sys.stderr, flush=True)
    results["load_average_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    rows = results["runs"]
    print(f"\n{cfg.topology.groups}x{cfg.topology.shards}, {args.steps} steps, K={args.sync_every}")
    print("| run | total s | loop s | per round ms | Δ per round ms | start-up s | ray.init s "
          "| fit() → worker s | final val loss |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ref = rows[name.replace("ray", "torchrun")]
        delta = r["per_round_ms"] - ref["per_round_ms"]
        print(
            f"| {name} | {r['total_s']:.1f} | {r['loop_s']:.1f} | {r['per_round_ms']:.0f} | "
            f"{delta:+.0f} | {r['startup_s']:.1f} | {r.get('ray_init_s', 0):.1f} | "
            f"{r.get('fit_to_worker_s', 0):.1f} | {r['final_val_loss']:.4f} |"
        )
    print(f"\nload average before/after: {results['load_average_before']} / "
          f"{results['load_average_after']}; wrote {args.out / 'results.json'}")  # fmt: skip


if __name__ == "__main__":
    main()
