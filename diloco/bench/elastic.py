"""Benchmark: goodput of elastic worker groups under injected failures, against the mesh job.

Same model, data, K and number of rounds for every run, G groups × S = 1 on this machine, gloo,
under each launcher of ``--launchers`` (default ``local,ray``):

* ``elastic`` — ``diloco launch local --elastic``: a killed group restarts alone (resuming its own
  checkpoint, healing θ from a live group); the others keep training;
* ``mesh`` — today's path: one process group under ``torchrun --max-restarts``; a killed worker
  stops every group, torchrun restarts the whole job and it resumes from the newest checkpoint;
* ``ray-elastic`` — ``diloco launch ray --address local --elastic``: one Ray Train run per group,
  Ray restarts the killed group alone, which heals as under ``elastic``;
* ``ray-mesh`` — ``diloco launch ray --address local`` (Ray today): Ray Train's
  ``FailureConfig`` restarts every worker from the newest checkpoint.

Each is run once without faults, then with one worker SIGKILLed (from this script, outside the
job) every N rounds for each N in ``--every``, N rounds measured in wall time at the no-fault
elastic run's pace (faults arrive like preemptions, whatever the job's progress; but a fault
waits until the job has logged a round past the previous fault's, so that a restart slower than
the fault interval cannot stall the run for ever), killing the groups' workers in turn (0, 1, …,
G−1, 0, …). Every path checkpoints every ``--checkpoint-every`` rounds.

Reported per run (a table, and JSON in ``--out``):

* **goodput**: useful inner steps per second ÷ the same path's no-fault rate. Useful inner steps
  are those whose pseudo-gradient reached θ: mesh, G × steps (the job ends complete; redone steps
  are waste); elastic, K × Σ_rounds (groups averaged in the round);
* **useful/s**: the absolute rate, comparable across paths;
* **rejoin** (median over faults; elastic paths): the kill → the killed group healed back into
  the quorum (its ``healed_at``): the restart latency of the launcher plus the wait for the next
  round boundary. Ray elastic − local elastic is what Ray adds to a group's restart;
* **stall** (median): the kill → the job past the round it had reached (mesh: restart + redone
  rounds; elastic: the survivors' wait for the heartbeat timeout, if any);
* **heal MB**: elastic, bytes moved to heal restarted groups (per fault);
* **final val loss**, and **overhead**: a no-fault elastic round's extra wall time over a mesh
  round's under the same launcher, in % of the mesh round.

    python -m diloco.bench.elastic                         # G=3, K=32, 40 rounds, N ∈ {5, 10}
    python -m diloco.bench.elastic --quick                 # 12 rounds, N = 5 only
    python -m diloco.bench.elastic --launchers ray         # only the Ray rows

Run it alone on the machine: timings are wall times. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from diloco.job.elastic import heal_records
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


#: The paths each launcher runs: its elastic one, then its mesh one.
PATHS = {"local": ("elastic", "mesh"), "ray": ("ray-elastic", "ray-mesh")}


def _descendants(proc: subprocess.Popen) -> list:
    import psutil

    return psutil.Process(proc.pid).children(recursive=True)


def _workers(proc: subprocess.Popen, name: str) -> list[tuple[int, int | None]]:
    """(pid, group or None) of the training processes under launcher ``proc`` of run ``name``:
    torchrun's and ``launch local``'s ``diloco train`` processes (not torchrun's agent), Ray's
    train workers (an elastic group's carry ``DILOCO_ELASTIC_GROUP``)."""
    import psutil

    out = []
    for child in _descendants(proc):
        try:
            cmdline = " ".join(child.cmdline())
            env = child.environ() if name.startswith("ray") else {}
        except psutil.Error:
            continue
        if name.startswith("ray"):
            if cmdline.startswith("ray::RayTrainWorker"):
                group = env.get("DILOCO_ELASTIC_GROUP")
                out.append((child.pid, None if group is None else int(group)))
        elif " train " in cmdline and "torch.distributed.run" not in cmdline:
            found = re.search(r"topology\.group_id=(\d+)", cmdline)
            out.append((child.pid, int(found.group(1)) if found else None))
    return sorted(out)


def _victim(proc: subprocess.Popen, index: int, name: str, groups: int) -> int | None:
    """The worker to kill for fault ``index``: group ``index mod G``'s (elastic), or the
    ``index mod G``-th worker of the job (mesh, whose workers are its groups)."""
    found = _workers(proc, name)
    if name.endswith("elastic"):
        return next((pid for pid, g in found if g == index % groups), None)
    return found[index % len(found)][0] if found else None


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


def _command(args: argparse.Namespace, name: str, overrides: list[str]) -> list[str]:
    sets = _sets(overrides)
    launch = [sys.executable, "-m", "diloco", "launch"]
    if name == "elastic":
        return [*launch, "local", "--groups", str(args.groups), "--elastic", "--restarts",
                "1000", *sets]  # fmt: skip
    if name == "mesh":
        return torchrun_cmd(args.groups, "-m", "diloco", "train", *sets, restarts=1000)
    elastic = ["--elastic"] if name == "ray-elastic" else []
    return [*launch, "ray", "--address", "local", *elastic, "--max-failures", "1000", *sets]


def run_job(args: argparse.Namespace, name: str, path: str, fault_every_s: float | None) -> dict:
    """One run (``name`` under ``--out``) of ``path`` (a :data:`PATHS` name): its wall time, the
    faults, and a timeline of (wall time, highest round logged) sampled every 0.2 s."""
    elastic = path.endswith("elastic")
    run_dir = Path(args.out) / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    overrides = [*_job(args), f"run.out_dir={run_dir}"]
    env = child_env({"OMP_NUM_THREADS": "1", "RUST_LOG": "warn"})
    if elastic:
        metrics = [run_dir / f"group{g}" / "metrics.jsonl" for g in range(args.groups)]
    else:
        metrics = [run_dir / "metrics.jsonl"]
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    t0 = time.time()
    cmd = _command(args, path, overrides)
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
        # The clock starts with the first logged round; a fault waits until the job has logged
        # a round past the previous fault's (a restart slower than the fault interval would
        # otherwise be killed again and again, and the run would never end).
        if now >= next_fault and (not faults or reached > faults[-1]["round"]):
            pid = _victim(proc, len(faults), path, args.groups)
            if pid is not None:
                group = len(faults) % args.groups
                os.kill(pid, signal.SIGKILL)
                faults.append({"at": time.time(), "pid": pid, "round": reached, "group": group})
            next_fault += fault_every_s
    wall = time.time() - t0
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (status {proc.returncode}); see {log.name}")
    return {
        "name": name,
        "path": path,
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


def _group_rounds(run_dir: Path, groups: int) -> int:
    """Σ over the run's rounds of the groups averaged in each, from every group's records (one
    per round: log_every = K). Not the summaries' ``group_rounds``: a restarted group's counts
    only the rounds since its restart, and a group killed near the end writes none."""
    seen: dict[int, int] = {}
    for g in range(groups):
        path = run_dir / f"group{g}" / "metrics.jsonl"
        for r in _read(path) if path.exists() else []:
            if "participants" in r:
                seen[r["outer_step"]] = max(seen.get(r["outer_step"], 0), r["participants"])
    return sum(seen.values())


def _rejoins(run: dict, run_dir: Path) -> tuple[list[float], list[float]]:
    """Per fault of an elastic run: kill → the killed group's next heal (s), and its MiB."""
    heals = {}
    for g in {f["group"] for f in run["faults"]}:
        heals[g] = heal_records(run_dir / f"group{g}" / "metrics.jsonl")
    rejoin, mib = [], []
    for f in run["faults"]:
        heal = next((h for h in heals[f["group"]] if h["healed_at"] > f["at"]), None)
        if heal is not None:
            rejoin.append(heal["healed_at"] - f["at"])
            mib.append(heal["heal_bytes"] / 2**20)
    return rejoin, mib


def measure(args: argparse.Namespace, run: dict) -> dict:
    """The table row of one run (module docstring)."""
    run_dir, K, G = Path(run["run_dir"]), args.sync_every, args.groups
    rejoin, heal_mb = [], []
    if run["elastic"]:
        paths = [run_dir / f"group{g}" / "summary.json" for g in range(G)]
        # A group restarted after the last round finds the run finished and writes none.
        summaries = [json.loads(p.read_text()) for p in paths if p.exists()]
        useful = K * _group_rounds(run_dir, G)
        rejoin, heal_mb = _rejoins(run, run_dir)
        val, train_wall = summaries[0]["final_val_loss"], max(s["wall_s"] for s in summaries)
    else:
        summary = json.loads((run_dir / "summary.json").read_text())
        useful, val, train_wall = G * args.rounds * K, summary["final_val_loss"], summary["wall_s"]
    stalls = [s for s in (_stall(run, f) for f in run["faults"]) if s is not None]
    logs = (
        [run_dir / f"group{g}" / "metrics.jsonl" for g in range(G)]
        if run["elastic"]
        else [run_dir / "metrics.jsonl"]
    )
    sync_ms = min(_own_sync_ms(path) for path in logs if path.exists())
    return {
        "run": run["name"],
        "path": run["path"],
        "faults": len(run["faults"]),
        "wall_s": run["wall_s"],
        "train_wall_s": train_wall,
        "useful_steps": useful,
        "useful_per_s": useful / run["wall_s"],
        "stall_s": statistics.median(stalls) if stalls else None,
        "rejoin_s": statistics.median(rejoin) if rejoin else None,
        "heal_mb": statistics.median(heal_mb) if heal_mb else None,
        "final_val_loss": val,
        "sync_ms": sync_ms,
    }


def _own_sync_ms(metrics: Path) -> float:
    """The median round's sync without the wait for the other groups (ms): ``reduce_s`` less
    ``reduce_wait_s`` (the mesh's wait inside the collective; the elastic exchange's). An elastic
    group also waits in the quorum for the last group to arrive; the caller takes the group that
    waited least, whose quorum wait is the coordinator's round trip, so that stays counted."""
    syncs = [r["reduce_s"] - r.get("reduce_wait_s", 0.0) for r in _read(metrics) if "reduce_s" in r]
    return 1e3 * statistics.median(syncs) if syncs else float("nan")


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def report(args: argparse.Namespace, rows: list[dict]) -> str:
    """The Markdown table; goodput against each path's own no-fault rate."""
    base = {r["path"]: r["useful_per_s"] for r in rows if r["faults"] == 0}
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
        goodput = r["useful_per_s"] / base[r["path"]]
        lines.append(
            f"| {r['run']} | {r['faults']} | {r['wall_s']:.1f} | {r['useful_steps']} | "
            f"{r['useful_per_s']:.1f} | {goodput:.1%} | {_fmt(r['stall_s'], '.1f')} | "
            f"{_fmt(r['rejoin_s'], '.1f')} | {_fmt(r['heal_mb'], '.2f')} | "
            f"{r['final_val_loss']:.4f} |"
        )
    lines.append("")
    no_fault = {r["run"]: r for r in rows if r["faults"] == 0}
    for launcher in args.launchers:
        e_name, m_name = PATHS[launcher]
        elastic, mesh = no_fault[e_name], no_fault[m_name]
        mesh_round, elastic_round = (r["train_wall_s"] / args.rounds for r in (mesh, elastic))
        lines.append(
            f"No faults, {launcher}: a round takes {mesh_round:.3f} s ({m_name}) and "
            f"{elastic_round:.3f} s ({e_name}): {elastic_round / mesh_round - 1:+.1%}; the sync "
            f"without waiting for other groups (Δ averaged; elastic: the group that waited least, "
            f"its quorum round trip included) {mesh['sync_ms']:.1f} ms vs "
            f"{elastic['sync_ms']:.1f} ms: "
            f"{(elastic['sync_ms'] - mesh['sync_ms']) / 1e3 / mesh_round:+.2%} of a mesh round."
        )
    rejoin = {}  # per elastic path: the median of its fault runs' medians
    for path in ("elastic", "ray-elastic"):
        values = [r["rejoin_s"] for r in rows if r["path"] == path and r["rejoin_s"] is not None]
        if values:
            rejoin[path] = statistics.median(values)
    if len(rejoin) == 2:
        lines.append(
            f"Restart latency (kill → the group back in the quorum, median): "
            f"{rejoin['elastic']:.1f} s (launch local) vs {rejoin['ray-elastic']:.1f} s (Ray): "
            f"Ray adds {rejoin['ray-elastic'] - rejoin['elastic']:+.1f} s."
        )
    return "\n".join(lines) + "\n"


def _run_all(args: argparse.Namespace) -> tuple[list[dict], float]:
    """Every path without faults, then with a fault every N rounds for each N of --every."""
    args.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    paths = [p for launcher in args.launchers for p in PATHS[launcher]]
    runs = [run_job(args, path, path, None) for path in paths]
    round_s = measure(args, runs[0])["train_wall_s"] / args.rounds  # the first elastic path's
    for n in (int(x) for x in args.every.split(",")):
        for path in paths:
            runs.append(run_job(args, f"{path}-every{n}", path, n * round_s))
    return runs, round_s


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
    p.add_argument(
        "--launchers",
        default="local,ray",
        help="comma-separated: local (launch local --elastic vs torchrun), ray (launch ray "
        "--elastic vs launch ray)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--render", action="store_true", help="re-render --out's results, run nothing")
    args = p.parse_args(argv)
    args.launchers = [x.strip() for x in args.launchers.split(",") if x.strip()]
    if not args.launchers or set(args.launchers) - set(PATHS):
        p.error(f"--launchers: a comma-separated choice of {', '.join(PATHS)}")
    if args.quick:
        args.rounds, args.every = 12, "5"
    if args.render:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        args = argparse.Namespace(**{**saved["settings"], "out": args.out})
        runs, round_s = saved["runs"], saved["round_s"]
    else:
        runs, round_s = _run_all(args)
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
