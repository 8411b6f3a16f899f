"""``diloco launch ray --elastic``: one Ray Train run per worker group, and a coordinator actor.

With ``topology.elastic`` each worker group is its own ``torch.distributed`` world that meets
the others only at round boundaries, through a coordinator (docs/elastic.md). Under Ray:

* **the coordinator** (:class:`~diloco.comm.elastic.coordinator.Coordinator`: torchft's
  lighthouse on PORT, the rendezvous store on PORT+1) runs in a Ray actor pinned to the driver's
  node (``NodeAffinitySchedulingStrategy(soft=False)``, no CPU reserved), bound to that node's
  address and a port chosen here (or ``--coordinator-port``). ``max_restarts=-1``: if its
  process dies, Ray starts it again on the same node with the same arguments, so on the same
  address, and the groups find it again at their next round boundary;
* **each group** is one Ray Train (V2) ``TorchTrainer`` of S workers —
  ``ScalingConfig(num_workers=S, placement_strategy="STRICT_PACK")`` (the group on one node),
  its own ``TorchConfig`` process group, ``FailureConfig(max_failures)`` and Ray Train run
  ``NAME-group<g>``. The driver runs the G ``fit()`` calls at once, one thread each. A failed
  worker fails only its own group's run: Ray Train restarts that group (a fresh worker group
  and placement group; the others keep their processes), which resumes its own newest
  checkpoint and heals θ from a live group (:func:`diloco.job.train.train`). Every group's
  rank 0 reports its metrics and checkpoints to its own Ray Train run, as without ``--elastic``;
* **a group that has used up its restarts** stops alone: the others train on to the end (with
  ``topology.min_groups`` groups or more; fewer stop after ``topology.quorum_timeout_s``, with
  their own line), then the job ends with one line naming the failed groups, their failures and
  newest checkpoints (exit status 2). Their checkpoints stay as they were.

Each group's worker processes carry ``DILOCO_ELASTIC_GROUP=<g>`` in their environment (to find
them from outside: ``grep -l DILOCO_ELASTIC_GROUP=1 /proc/*/environ``). At the end the driver
writes ``RUN_DIR/elastic.json``: per group its Ray Train run, starts, ``fit()`` time, failure
and the times it was healed back into the quorum.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diloco.comm.elastic.coordinator import Coordinator, CoordinatorSettings, store_port
from diloco.config import Config
from diloco.errors import note
from diloco.files import write_text_atomic
from diloco.job.elastic import group_dir, heal_records
from diloco.launchers.local import free_port_pair
from diloco.launchers.ray_plan import RayLaunchError, WorkerPlan, failure_detail
from diloco.persist.resume import list_checkpoints

__all__ = ["GROUP_ENV", "CoordinatorActor", "run_groups"]

#: The environment variable that names a worker process's group (set by Ray on each worker).
GROUP_ENV = "DILOCO_ELASTIC_GROUP"

#: ``make_trainer(run_name, workers, placement_strategy, topology_overrides, extra_env)``: a
#: ``TorchTrainer`` of the job's worker function (:func:`diloco.launchers.ray_launcher._fit`).
MakeTrainer = Callable[[str, int, str, dict[str, Any], dict[str, str]], Any]


class CoordinatorActor:
    """The job's coordinator inside a Ray actor (restarted by Ray with the same arguments)."""

    def __init__(self, host: str, port: int, settings: dict[str, Any]):
        self._coordinator = Coordinator(host, port, CoordinatorSettings(**settings))
        self._pid = os.getpid()

    def address(self) -> str:
        return self._coordinator.address

    def pid(self) -> int:
        return self._pid


def _start_coordinator(ray, cfg: Config, name: str, port: int) -> tuple[Any, str]:
    """The coordinator actor on the driver's node and its ``HOST:PORT`` once it listens.

    ``port`` 0: a free pair picked here, and another one if it was taken meanwhile (the actor
    binds it seconds later; an outgoing connection may take PORT+1 in between), up to 5 times.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    host = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
    settings = asdict(CoordinatorSettings.from_topology(cfg.topology))
    actor_class = ray.remote(num_cpus=0, max_restarts=-1)(CoordinatorActor)
    for attempt in range(1 if port else 5):
        chosen = port or free_port_pair(host)
        actor = actor_class.options(
            name=f"{name}-coordinator" + (f"-{attempt}" if attempt else ""),
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env={"env_vars": {"RUST_LOG": os.environ.get("RUST_LOG", "warn")}},
        ).remote(host, chosen, settings)
        try:
            return actor, ray.get(actor.address.remote(), timeout=300)
        except Exception as e:  # the constructor failed (a busy port), or Ray could not place it
            lines = [line for line in str(e).splitlines() if line.strip()]
            why = lines[-1].strip() if lines else type(e).__name__
    raise RayLaunchError(
        f"the coordinator did not start on {host}:{chosen} (and {store_port(chosen)}): {why}; "
        "choose another --coordinator-port"
    )


def _pid(ray, actor) -> int | None:
    """The coordinator actor's process id, None if it cannot be reached."""
    try:
        return ray.get(actor.pid.remote(), timeout=60)
    except Exception:  # dead for good (Ray could not restart it), or Ray is going away
        return None


@dataclass
class _Group:
    """One group's Ray Train run, driven by a thread of the driver."""

    group: int
    run_name: str
    trainer: Any
    thread: threading.Thread | None = None
    fit_s: float = 0.0
    error: BaseException | None = None

    def start(self, max_failures: int) -> None:
        self.thread = threading.Thread(
            target=self._fit, args=(max_failures,), name=self.run_name, daemon=True
        )
        self.thread.start()

    def _fit(self, max_failures: int) -> None:
        t0 = time.perf_counter()
        try:
            self.trainer.fit()
        except Exception as e:  # reported when every group is done
            self.error = e
            note(
                f"group {self.group} failed for good (--max-failures {max_failures} restarts "
                f"used up): {failure_detail(e)}; the other groups go on"
            )
        self.fit_s = time.perf_counter() - t0


def run_groups(
    ray,
    cfg: Config,
    plan: WorkerPlan,
    name: str,
    ray_dir: Path,
    make_trainer: MakeTrainer,
    max_failures: int,
    init_s: float,
    coordinator_port: int = 0,
) -> dict[str, Any]:
    """Run the elastic job (module docstring); returns the job's summary.

    Raises:
        RayLaunchError: the coordinator could not start, or a group used up its restarts (one
            line, after the other groups have finished).
    """
    actor, address = _start_coordinator(ray, cfg, name, coordinator_port)
    first_pid = _pid(ray, actor)
    overrides = {"elastic": True, "coordinator": address}
    groups = [
        _Group(
            g,
            f"{name}-group{g}",
            make_trainer(
                f"{name}-group{g}",
                plan.shards,
                "STRICT_PACK",
                {**overrides, "group_id": g},
                {GROUP_ENV: str(g)},
            ),
        )
        for g in range(plan.groups)
    ]
    print(
        f"diloco: Ray run {name}: {plan.layout} as elastic groups, one Ray Train run each "
        f"({name}-group<g>, STRICT_PACK, {plan.resources} per worker, {plan.backend}); "
        f"coordinator {address} (store on port {store_port(int(address.rsplit(':', 1)[1]))}); "
        f"Ray connected in {init_s:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    try:
        for gr in groups:
            gr.start(max_failures)
        while any(gr.thread.is_alive() for gr in groups):
            for gr in groups:
                gr.thread.join(timeout=0.5)
        pid = _pid(ray, actor)
        restarted = None if pid is None else pid != first_pid  # None: unreachable at the end
    finally:
        ray.kill(actor)
        for gr in groups:  # snapshots whose upload a failure cut short
            shutil.rmtree(ray_dir / f"{gr.run_name}.staging", ignore_errors=True)
    report = _write_report(ray_dir, address, restarted, groups)
    failed = [gr for gr in groups if gr.error is not None]
    if failed:
        raise RayLaunchError(_failure_line(cfg, failed, groups, max_failures))
    return _job_summary(cfg, groups, report, init_s)


def _starts(ray_dir: Path, run_name: str) -> int:
    """How many times the group's workers started (counted by its rank 0 in ray_worker)."""
    try:
        return int((ray_dir / f"{run_name}.attempts").read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def _write_report(
    ray_dir: Path, address: str, restarted: bool | None, groups: list[_Group]
) -> dict:
    run_dir = ray_dir.parent
    metrics = {gr.group: group_dir(run_dir, gr.group) / "metrics.jsonl" for gr in groups}
    report = {
        "launcher": "ray",
        "coordinator": address,
        "coordinator_restarted": restarted,
        "groups": [
            {
                "group": gr.group,
                "ray_run": gr.run_name,
                "starts": _starts(ray_dir, gr.run_name),
                "restarts": max(0, _starts(ray_dir, gr.run_name) - 1),
                "fit_s": gr.fit_s,
                "error": None if gr.error is None else failure_detail(gr.error),
                "healed_at": [r["healed_at"] for r in heal_records(metrics[gr.group])],
            }
            for gr in groups
        ],
    }
    write_text_atomic(run_dir / "elastic.json", json.dumps(report, indent=2) + "\n")
    return report


def _failure_line(
    cfg: Config, failed: list[_Group], groups: list[_Group], max_failures: int
) -> str:
    """One line: each failed group, its failures, its last failure and its newest checkpoint."""
    parts = []
    for gr in failed:
        newest = list_checkpoints(group_dir(cfg.run.out_dir, gr.group))
        parts.append(
            f"group {gr.group} failed {max_failures + 1} time(s) (--max-failures {max_failures} "
            f"restarts per group), last: {failure_detail(gr.error)}; its newest checkpoint: "
            f"{newest[0] if newest else 'none'}"
        )
    done = [gr.group for gr in groups if gr.error is None]
    others = f"groups {done} finished" if done else "no group finished"
    return f"{'; '.join(parts)}; {others} (outputs in {cfg.run.out_dir})"


def _job_summary(cfg: Config, groups: list[_Group], report: dict, init_s: float) -> dict[str, Any]:
    """Every group's ``summary.json`` gets Ray's start-up and its own ``fit()`` time; the job's
    summary is the first group's, plus ``restarts`` per group and ``group_summaries``."""
    summaries = {}
    for gr in groups:
        path = group_dir(cfg.run.out_dir, gr.group) / "summary.json"
        if not path.exists():  # came back after the last round: nothing of its own to report
            continue
        summary = json.loads(path.read_text(encoding="utf-8"))
        summary["ray_init_s"], summary["ray_fit_s"] = init_s, gr.fit_s
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
        summaries[gr.group] = summary
    if not summaries:
        raise RayLaunchError(f"no group wrote a summary.json under {cfg.run.out_dir}")
    job = dict(summaries[min(summaries)])
    job["ray_fit_s"] = max(gr.fit_s for gr in groups)
    job["restarts"] = {g["group"]: g["restarts"] for g in report["groups"]}
    job["group_summaries"] = summaries
    return job
