"""Specification of ``diloco launch ray --elastic``: Ray runs each worker group on its own, and a
failed group restarts alone.

Real Ray on this machine, real processes, faults caused from outside: the test finds a group's
worker process through the ``DILOCO_ELASTIC_GROUP`` variable Ray sets in its environment and
SIGKILLs it. The jobs run side by side in one module fixture (most of their time is Ray and
torch start-up): the no-fault job on a private Ray (``--address local``) beside the same job
under ``diloco launch local --elastic``, and the two fault jobs on one shared Ray that a helper
process holds (``--address`` of that cluster, as on a running cluster).
``DILOCO_TEST_STEP_DELAY_S`` stretches the fault jobs in wall time so that a fault lands
mid-run without loading the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
from helpers import child_env, sets, tiny_overrides

from diloco.cli import main
from diloco.config import load_config
from diloco.errors import ConfigError
from diloco.job.metrics import read_metrics
from diloco.launchers import ray_launcher
from diloco.launchers.ray_elastic import GROUP_ENV
from diloco.launchers.ray_launcher import ELASTIC_PROBE, launch_ray
from diloco.launchers.ray_plan import RayResourceError, check_resources, plan_workers
from diloco.persist.export import export
from diloco.persist.resume import newest_checkpoint
from diloco.testing import faults

pytest.importorskip("ray")
pytest.importorskip("torchft")

TIMEOUT_S = 420
#: G = 2 groups × S = 1, K = 4, a checkpoint every 2 rounds (the default heartbeat timeout, 10 s:
#: a busy machine must not make a group miss a round of the no-fault job).
RUN = tiny_overrides(
    24,
    4,
    "train.eval_every=8",
    "train.log_every=4",
    "train.checkpoint_every=2",
    "topology.groups=2",
)
#: The fault jobs: 40 steps stretched to ≥ 6 s of training per group; a dead group is dropped
#: after 3 s of silence.
FAULT_RUN = [*RUN, "train.steps=40", "topology.heartbeat_timeout_s=3",
             "topology.quorum_timeout_s=400"]  # fmt: skip
#: The restart test's groups wait for each other at every round (min_groups = G), so group 0
#: cannot finish before the restarted group 1 is back, however long Ray takes to restart it.
RESTART_RUN = [*FAULT_RUN, "topology.min_groups=2"]
STEP_DELAY = {faults.STEP_DELAY_S: "0.15"}
# Several jobs share two busy cores: give Ray Train's worker groups more than their default 60 s
# to start (imports in every worker process) before it counts a failed start.
RAY_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}


# ---------------------------------------------------------------------------------- helpers
@dataclass
class Job:
    """A finished ``diloco`` launch: its run directory, exit status, output, and the worker
    processes the test saw per group before its fault (and which it killed)."""

    run_dir: Path
    returncode: int
    stderr: str
    stdout: str
    before: dict[int, list[int]] = field(default_factory=dict)
    killed: list[int] = field(default_factory=list)

    def ok(self) -> Job:
        assert self.returncode == 0, f"{self.run_dir} failed:\n{self.stderr[-6000:]}"
        return self

    def summary(self, group: int) -> dict:
        return json.loads((self.run_dir / f"group{group}" / "summary.json").read_text())

    def elastic_report(self) -> dict:
        return json.loads((self.run_dir / "elastic.json").read_text())


def start(run_dir: Path, launcher: list[str], overrides: list[str], env: dict) -> subprocess.Popen:
    """``python -m diloco launch …`` in the background; its output goes to ``run_dir.log``."""
    cmd = [sys.executable, "-m", "diloco", "launch", *launcher,
           *sets([*overrides, f"run.out_dir={run_dir}"])]  # fmt: skip
    log = open(f"{run_dir}.log", "w")  # noqa: SIM115 - the child holds it
    err = open(f"{run_dir}.err", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, env=child_env({**RAY_ENV, **env}), stdout=log, stderr=err)


def wait(proc: subprocess.Popen, run_dir: Path, **seen) -> Job:
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out, err = Path(f"{run_dir}.log").read_text(), Path(f"{run_dir}.err").read_text()
    return Job(run_dir, proc.returncode, err, out, **seen)


def group_workers(root: psutil.Process, label: str) -> dict[int, list[int]]:
    """The Ray worker processes under ``root`` of the job labelled ``label``, by group."""
    out: dict[int, list[int]] = {}
    for p in root.children(recursive=True):
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get(faults.MARKER_DIR) == label and GROUP_ENV in env:
            out.setdefault(int(env[GROUP_ENV]), []).append(p.pid)
    return out


def wait_until(condition, what: str, proc: subprocess.Popen, run_dir: Path) -> None:
    """Poll ``condition`` while the launcher ``proc`` runs; fail with its output otherwise."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        err = Path(f"{run_dir}.err").read_text()[-6000:]
        assert proc.poll() is None, f"the launcher exited before {what}:\n{err}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def last_step(run_dir: Path, group: int) -> int:
    try:
        return max((r["step"] for r in read_metrics(run_dir / f"group{group}" / "metrics.jsonl")),
                   default=-1)  # fmt: skip
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def starts(run_dir: Path, group: int) -> int:
    """Starts of the group's Ray workers so far (the attempts its rank 0 counted)."""
    found = list((run_dir / "ray").glob(f"*-group{group}.attempts"))
    return int(found[0].read_text().strip() or 0) if found else 0


def final_theta(run_dir: Path, group: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"group{group}" / "final_model.pt")


def val_losses(run_dir: Path, group: int) -> dict[int, float]:
    records = read_metrics(run_dir / f"group{group}" / "metrics.jsonl")
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


# ---------------------------------------------------------------------------------- the jobs
#: The shared cluster and its drivers: Ray on 127.0.0.1, without token authentication (a
#: cluster started by ``ray.init`` keeps its token to itself; nothing leaves loopback here).
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
HOLD_RAY = textwrap.dedent("""
    import os, sys
    import ray
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             object_store_memory=256 * 2**20, _temp_dir=f"/tmp/ray-{os.getuid()}")
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # until the test closes it (or dies)
    ray.shutdown()
""")


def no_fault(root: Path) -> tuple[Job, Job]:
    """The same G = 2 job under ``launch local --elastic`` and ``launch ray --elastic``."""
    local, ray = root / "local", root / "ray"
    procs = [
        start(local, ["local", "--groups", "2", "--elastic"], RUN, {}),
        start(ray, ["ray", "--elastic", "--address", "local"], RUN, {}),
    ]
    return wait(procs[0], local), wait(procs[1], ray)


def kill_group1(root: Path, cluster: tuple[str, psutil.Process], name: str, kills: int) -> Job:
    """A fault job on the shared cluster: SIGKILL group 1's worker once it has checkpointed
    round 2; with ``kills`` = 2 again as soon as its restarted worker has started training."""
    address, holder = cluster
    run_dir, label = root / name, str(root / name)
    overrides = RESTART_RUN if kills == 1 else FAULT_RUN
    env = {**STEP_DELAY, **LOOPBACK, faults.MARKER_DIR: label}
    launcher = ["ray", "--elastic", "--address", address, "--max-failures", "1"]
    proc = start(run_dir, launcher, overrides, env)
    wait_until(lambda: last_step(run_dir, 1) >= 12, "group 1 past round 3", proc, run_dir)
    before = group_workers(holder, label)
    killed = [before[1][0]]
    os.kill(killed[0], signal.SIGKILL)
    if kills == 2:
        wait_until(lambda: starts(run_dir, 1) == 2, "group 1's second start", proc, run_dir)
        (pid,) = group_workers(holder, label)[1]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    return wait(proc, run_dir, before=before, killed=killed)


class Jobs:
    def __init__(self, root: Path, pool: ThreadPoolExecutor, cluster: tuple[str, psutil.Process]):
        self._jobs = {
            "no_fault": pool.submit(no_fault, root),
            "restart": pool.submit(kill_group1, root, cluster, "restart", 1),
            "give_up": pool.submit(kill_group1, root, cluster, "give_up", 2),
        }

    def __getattr__(self, name: str):
        return self._jobs[name].result()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Iterator[Jobs]:
    root = tmp_path_factory.mktemp("ray_elastic")
    env = child_env({**LOOPBACK, "RAY_USAGE_STATS_ENABLED": "0"})
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RAY], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        address = holder.stdout.readline().strip()
        assert address, "the shared Ray cluster did not start"
        with ThreadPoolExecutor(max_workers=3) as pool:
            yield Jobs(root, pool, (address, psutil.Process(holder.pid)))
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


# ---------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_ray_elastic_groups_train_exactly_like_launch_local_elastic(jobs):
    """G = 2 × S = 1: every group has the same val losses and final θ under Ray as under
    ``diloco launch local --elastic``; each group's metrics and checkpoints reach its own Ray
    Train run."""
    local, ray = (job.ok() for job in jobs.no_fault)
    for g in range(2):
        want = val_losses(local.run_dir, g)
        assert sorted(want) == [0, 8, 16, 24]
        assert val_losses(ray.run_dir, g) == want
        theta, expected = final_theta(ray.run_dir, g), final_theta(local.run_dir, g)
        assert all(torch.equal(theta[k], expected[k]) for k in expected)
        assert ray.summary(g)["rounds_below_groups"] == 0
        (run,) = [p for p in (ray.run_dir / "ray").iterdir() if p.name.endswith(f"-group{g}")]
        assert [json.loads(m.read_text())["round"] for m in
                sorted(run.glob("checkpoint_*/meta.json"))] == [4, 6]  # fmt: skip # keep_last 2
    assert [g["restarts"] for g in ray.elastic_report()["groups"]] == [0, 0]
    assert "restarts per group {0: 0, 1: 0}" in ray.stdout
    assert "diloco: node 127.0.0.1: ranks 0-0, group 1" in ray.stderr


@pytest.mark.slow
def test_a_killed_worker_restarts_only_its_group_which_heals_and_rejoins(jobs):
    """SIGKILL group 1's worker: Ray restarts group 1 alone (group 0 keeps its process), the new
    worker resumes group 1's own checkpoint, heals θ from group 0 and rejoins; the run finishes
    with the same θ in every group."""
    job = jobs.restart.ok()
    assert job.summary(0)["pids"] == job.before[0]
    assert job.summary(1)["pids"] != job.before[1]
    assert [g["restarts"] for g in job.elastic_report()["groups"]] == [0, 1]
    assert "Ray restart: resuming from" in job.stderr and f"{job.run_dir}/group1/" in job.stderr
    assert job.summary(1)["healed_self"] and job.elastic_report()["groups"][1]["healed_at"]
    theta0, theta1 = final_theta(job.run_dir, 0), final_theta(job.run_dir, 1)
    assert all(torch.equal(theta0[k], theta1[k]) for k in theta0)
    assert {(job.summary(g)["theta_sum"], job.summary(g)["theta_sumsq"]) for g in (0, 1)} == {
        (job.summary(0)["theta_sum"], job.summary(0)["theta_sumsq"])
    }


@pytest.mark.slow
def test_a_group_killed_past_max_failures_ends_the_job_with_one_line(jobs, tmp_path):
    """--max-failures 1 and group 1's worker killed twice: group 0 trains to the end, then the
    job exits 2 with one line naming group 1, its failures and its newest checkpoint, which is
    complete and loadable."""
    job = jobs.give_up
    assert job.returncode == 2, job.stderr[-3000:]
    (line,) = [x for x in job.stderr.splitlines() if x.startswith("diloco: error:")]
    assert line == job.stderr.strip().splitlines()[-1]
    assert line.startswith("diloco: error: group 1 failed 2 time(s) (--max-failures 1 restarts")
    assert "groups [0] finished" in line
    ckpt, meta = newest_checkpoint(job.run_dir / "group1")
    assert f"its newest checkpoint: {ckpt};" in line
    assert meta["complete"] and meta["step"] >= 8  # round 2's, or a later one
    assert export(ckpt, tmp_path / "theta.pt")["step"] == meta["step"]
    assert job.summary(0)["steps"] == 40
    assert job.elastic_report()["groups"][1]["error"]


# ---------------------------------------------------------------------------------- plain functions
def test_elastic_groups_are_placed_whole_or_refused_with_one_line():
    """--elastic places each group's S workers on one node (STRICT_PACK): nodes that hold
    enough workers but not whole groups are refused before anything starts."""
    plan = plan_workers(load_config(None, ["topology.groups=2", "topology.shards=2"]))
    assert check_resources(plan, [{"CPU": 2.0}, {"CPU": 2.0}], whole_groups=True) is None
    assert "will span nodes" in check_resources(plan, [{"CPU": 3.0}, {"CPU": 1.0}])
    with pytest.raises(RayResourceError) as info:
        check_resources(plan, [{"CPU": 3.0}, {"CPU": 1.0}], whole_groups=True)
    assert str(info.value) == (
        "the cluster's nodes can hold only 1 of the 2 groups × 2 shards as whole groups "
        "(elastic: a group's 2 workers share one node, each needs 1 CPU); lower "
        "topology.shards or --cpus-per-worker, or add larger nodes"
    )
    with pytest.raises(RayResourceError, match="needs 4 CPUs"):
        check_resources(plan, [{"CPU": 3.0}], whole_groups=True)


def test_elastic_is_asked_for_by_the_flag_or_by_the_config(monkeypatch, capsys):
    """``--elastic`` and ``topology.elastic: true`` both give an elastic job (the launcher sets
    each group's id and coordinator); a config error that elastic does not explain stays."""
    seen = []
    summary = dict.fromkeys(("final_val_loss", "steps", "tokens", "wall_s", "ray_init_s",
                             "ray_fit_s"), 0)  # fmt: skip
    monkeypatch.setattr(ray_launcher, "launch_ray", lambda cfg, **_: seen.append(cfg) or summary)
    for argv in (["--elastic"], sets(["topology.elastic=true"])):
        assert main(["launch", "ray", *sets(["topology.groups=2"]), *argv]) == 0
        assert seen.pop().topology.elastic
    assert main(["launch", "ray", *sets(["topology.groups=2", "topology.group_id=1"])]) == 2
    assert "topology.group_id=1 is set but topology.elastic is false" in capsys.readouterr().err


def test_an_explicit_resume_path_is_refused_for_elastic_groups_before_ray_starts():
    cfg = load_config(None, ["topology.groups=2", "topology.elastic=true", *ELASTIC_PROBE])
    with pytest.raises(ConfigError, match="each group resumes its own"):
        launch_ray(cfg, address="local", resume="/runs/a/checkpoints/step_8")
