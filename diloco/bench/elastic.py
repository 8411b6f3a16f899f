"""Benchmark: goodput of elastic worker groups under injected failures, against the mesh job.

Same model, data, K and number of rounds for every run, G groups × S = 1 on this machine, gloo:

* ``elastic`` — ``diloco launch local --elastic``: a killed group restarts alone (resuming its own
  checkpoint, healing θ from a live group); the others keep training;
* ``mesh`` — today's path: one process group under ``torchrun --max-restarts``; a killed worker
  stops every group, torchrun restarts the whole job and it resumes from the newest checkpoint.

Each is run once without faults, then with one worker SIGKILLed (from this script, outside the
job) every N rounds for each N in ``--every``, N rounds measured in wall time at the no-fault
elastic run's pace (faults arrive like preemptions, whatever the job's progress), killing the
groups' workers in turn (0, 1, …, G−1, 0, …). Both paths checkpoint every ``--checkpoint-every``
rounds.

Reported per run (a table, and JSON in ``--out``):

* **goodput**: useful inner steps per second ÷ the same path's no-fault rate. Useful inner steps
  are those whose pseudo-gradient reached θ: mesh, G × steps (the job ends complete; redone steps
  are waste); elastic, K × Σ_rounds (groups averaged in the round);
* **useful/s**: the absolute rate, comparable across paths;
* **recovery** (median over faults): elastic, death → the restarted group back in the quorum;
  mesh, death → the job past the round it had reached at the death (restart + redone rounds);
* **heal MB**: elastic, bytes moved to heal restarted groups (per fault);
* **final val loss**, and **overhead**: a no-fault elastic round's extra wall time over a mesh
  round's, in % of the mesh round.

    python -m diloco.bench.elastic                         # G=3, K=32, 40 rounds, N ∈ {5, 10}
    python -m diloco.bench.elastic --quick                 # 12 rounds, N = 5 only

Run it alone on the machine: timings are wall times. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from diloco.launchers.local import child_env, torchrun_cmd

__all__ = ["main"]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _job(args: argparse.Namespace) -> list[str]:
    """The overrides every run shares (the model, K, the length, checkpoints, logging)."""
    return [
        "model.n_layer=4",
        "model.n_embd=128",
        "model.block_size=128",
        f"train.steps={args.rounds * args.sync_every}",
        f"outer.sync_every={args.sync_every}",
        f"train.checkpoint_every={args.checkpoint_every}",
        f"train.log_every={args.sync_every}",
        f"train.eval_every={args.rounds * args.sync_every}",
        "train.eval_batches=4",
        "inner.warmup_steps=8",
        "run.device=cpu",
        "run.progress=false",
        "topology.backend=gloo",
        f"topology.groups={args.groups}",
        f"topology.heartbeat_timeout_s={args.heartbeat_timeout_s}",
        *args.overrides,
    ]


def _workers(proc: subprocess.Popen) -> list[tuple[int, str]]:
    """(pid, command line) of the training processes under ``proc`` (not torchrun's agent)."""
    import psutil

    out = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if " train " in cmdline and "torch.distributed.run" not in cmdline:
            out.append((child.pid, cmdline))
    return out


def _victim(proc: subprocess.Popen, index: int, elastic: bool) -> int | None:
    """The worker to kill for fault ``index``: group ``index mod G``'s (elastic), or the
    ``index mod G``-th worker of the job (mesh, whose workers are its groups)."""
    found = sorted(_workers(proc))
    if not found:
        return None
    if elastic:
        for pid, cmdline in found:
            if f"topology.group_id={index % len(found)} " in cmdline + " ":
                return pid
        return None
    return found[index % len(found)][0]


def _rounds_seen(metrics: list[Path]) -> int:
    """The highest round any of the runs' metrics files has logged (0 when none yet)."""
    best = 0
    for path in metrics:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                best = max(best, int(json.loads(line).get("outer_step", 0)))
            except (json.JSONDecodeError, ValueError):
                continue
    return best


def run_job(
    args: argparse.Namespace, name: str, elastic: bool, fault_every_s: float | None
) -> dict:
    """One run (``name`` under ``--out``): its wall time, the faults, and a timeline of
    (wall time, highest round logged) sampled every 0.2 s."""
    run_dir = Path(args.out) / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    overrides = [*_job(args), f"run.out_dir={run_dir}"]
    env = child_env({"OMP_NUM_THREADS": "1", "RUST_LOG": "warn"})
    if elastic:
        cmd = [
            sys.executable,
            "-m",
            "diloco",
            "launch",
            "local",
            "--groups",
            str(args.groups),
            "--elastic",
            "--restarts",
            "1000",
            *_sets(overrides),
        ]
        metrics = [run_dir / f"group{g}" / "metrics.jsonl" for g in range(args.groups)]
    else:
        target = ["-m", "diloco", "train", *_sets(overrides)]
        cmd = torchrun_cmd(args.groups, *target, restarts=1000)
        metrics = [run_dir / "metrics.jsonl"]
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    faults: list[dict] = []
    timeline: list[tuple[float, int]] = []
    next_fault = None
    while proc.poll() is None:
        time.sleep(0.2)
        now, reached = time.time(), _rounds_seen(metrics)
        timeline.append((now, reached))
        if fault_every_s is None or reached < 1:
            continue
        next_fault = now + fault_every_s if next_fault is None else next_fault
        if now >= next_fault:  # the clock starts with the first logged round
            pid = _victim(proc, len(faults), elastic)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                faults.append({"at": time.time(), "pid": pid, "round": reached})
            next_fault += fault_every_s
    wall = time.time() - t0
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (status {proc.returncode}); see {log.name}")
    return {
        "name": name,
        "elastic": elastic,
        "wall_s": wall,
        "faults": faults,
        "timeline": timeline,
        "run_dir": str(run_dir),
    }


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stall(run: dict, fault: dict) -> float | None:
    """Seconds from a fault until the job logged a round past the one it had reached."""
    return next(
        (t - fault["at"] for t, r in run["timeline"] if t > fault["at"] and r > fault["round"]),
        None,
    )


def measure(args: argparse.Namespace, run: dict) -> dict:
    """The table row of one run (module docstring)."""
    run_dir, K, G = Path(run["run_dir"]), args.sync_every, args.groups
    rejoin, heal_mb = [], []
    if run["elastic"]:
        summaries = [
            json.loads((run_dir / f"group{g}" / "summary.json").read_text()) for g in range(G)
        ]
        # A group that was away did not see every round; the most complete view counts them.
        useful = K * max(s["group_rounds"] for s in summaries)
        report = json.loads((run_dir / "elastic.json").read_text())
        for r in (r for g in report["groups"] for r in g["recoveries"]):
            if r["recovery_s"] is not None:
                rejoin.append(r["recovery_s"])
                heal_mb.append(r["heal_bytes"] / 2**20)
        val, train_wall = summaries[0]["final_val_loss"], max(s["wall_s"] for s in summaries)
    else:
        summary = json.loads((run_dir / "summary.json").read_text())
        useful, val, train_wall = G * args.rounds * K, summary["final_val_loss"], summary["wall_s"]
    stalls = [s for s in (_stall(run, f) for f in run["faults"]) if s is not None]
    first = run_dir / "group0" / "metrics.jsonl" if run["elastic"] else run_dir / "metrics.jsonl"
    syncs = [r["reduce_s"] for r in _read(first) if "reduce_s" in r]
    return {
        "run": run["name"],
        "faults": len(run["faults"]),
        "wall_s": run["wall_s"],
        "train_wall_s": train_wall,
        "useful_steps": useful,
        "useful_per_s": useful / run["wall_s"],
        "stall_s": statistics.median(stalls) if stalls else None,
        "rejoin_s": statistics.median(rejoin) if rejoin else None,
        "heal_mb": statistics.median(heal_mb) if heal_mb else None,
        "final_val_loss": val,
        "sync_ms": 1e3 * statistics.median(syncs) if syncs else float("nan"),
    }


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def report(args: argparse.Namespace, rows: list[dict]) -> str:
    """The Markdown table; goodput against each path's own no-fault rate."""
    base = {r["run"].split("-")[0]: r["useful_per_s"] for r in rows if r["faults"] == 0}
    lines = [
        f"G = {args.groups} groups × S = 1, K = {args.sync_every}, {args.rounds} rounds, "
        f"checkpoint every {args.checkpoint_every} rounds, heartbeat timeout "
        f"{args.heartbeat_timeout_s:g} s; load average before: {args.load_before}",
        "",
        "| run | faults | wall s | useful steps | useful/s | goodput | stall s | rejoin s "
        "| heal MiB | final val loss |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        goodput = r["useful_per_s"] / base[r["run"].split("-")[0]]
        lines.append(
            f"| {r['run']} | {r['faults']} | {r['wall_s']:.1f} | {r['useful_steps']} | "
            f"{r['useful_per_s']:.1f} | {goodput:.1%} | {_fmt(r['stall_s'], '.1f')} | "
            f"{_fmt(r['rejoin_s'], '.1f')} | {_fmt(r['heal_mb'], '.2f')} | "
            f"{r['final_val_loss']:.4f} |"
        )
    mesh, elastic = (next(r for r in rows if r["run"] == n) for n in ("mesh", "elastic"))
    mesh_round, elastic_round = (r["train_wall_s"] / args.rounds for r in (mesh, elastic))
    lines += [
        "",
        f"No faults: a round takes {mesh_round:.3f} s (mesh) and {elastic_round:.3f} s (elastic):"
        f" {elastic_round / mesh_round - 1:+.1%}; the sync itself (Δ averaged, incl. the quorum)"
        f" {mesh['sync_ms']:.1f} ms (mesh) vs {elastic['sync_ms']:.1f} ms (elastic): "
        f"{(elastic['sync_ms'] - mesh['sync_ms']) / 1e3 / mesh_round:+.2%} of a mesh round.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diloco.bench.elastic", description=__doc__)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--sync-every", type=int, default=32, help="K")
    p.add_argument("--every", default="10,5", help="fault every N rounds, comma-separated")
    p.add_argument("--checkpoint-every", type=int, default=2, help="rounds, both paths")
    p.add_argument("--heartbeat-timeout-s", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="12 rounds, faults every 5 rounds only")
    p.add_argument("--out", default="bench_results/elastic")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.every = 12, "5"
    args.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runs = [run_job(args, "elastic", True, None), run_job(args, "mesh", False, None)]
    round_s = measure(args, runs[0])["train_wall_s"] / args.rounds
    for n in (int(x) for x in args.every.split(",")):
        for elastic in (True, False):
            name = f"{'elastic' if elastic else 'mesh'}-every{n}"
            runs.append(run_job(args, name, elastic, n * round_s))
    rows = [measure(args, r) for r in runs]
    table = report(args, rows)
    print(table, end="")
    out = Path(args.out)
    (out / "results.md").write_text(table)
    payload = {
        "settings": {k: v for k, v in vars(args).items()},
        "round_s": round_s,
        "rows": rows,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
