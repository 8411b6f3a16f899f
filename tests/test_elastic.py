"""Elastic worker groups (``topology.elastic``): the mesh path's maths, and faults survived.

Every multi-process test runs real processes on this machine: ``diloco launch local --elastic``
starts the coordinator (torchft's lighthouse and a rendezvous store) and one process per group
on gloo over loopback. Faults are caused from outside the processes: SIGKILL of a group's worker
during its inner steps and (stopped there by a test hook) inside the exchange, SIGSTOP/SIGCONT
past the heartbeat timeout, SIGKILL of the coordinator. ``DILOCO_TEST_STEP_DELAY_S`` stretches
the run in wall time (a sleep per step) so a fault lands mid-run without loading the CPU.

The final val loss of a run with a fault is compared with the no-fault run within
``FAULT_TOLERANCE``: a lost or healed group changes which data the rounds average (the maths is
the same, the data is not); the runs here stayed within 0.015 of the no-fault run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from helpers import sets, tiny_overrides

from diloco.comm.elastic.quorum import Member, Quorum, admit
from diloco.config import load_config
from diloco.errors import ConfigError
from diloco.job.metrics import read_metrics
from diloco.launchers.local import child_env

FAULT_TOLERANCE = 0.05
GROUPS = 3
#: The fault tests' job: 240 steps, K = 4 (60 rounds), a checkpoint every 5 rounds, groups
#: dropped after 5 s of silence (generous: a loaded 2-core machine must not drop a live group);
#: with the step delay about 20 s of training, so that a group killed at step 24 has time to
#: restart and rejoin.
FAULT_RUN = tiny_overrides(
    240,
    4,
    "train.eval_every=40",
    "train.log_every=20",
    "train.checkpoint_every=5",
    "topology.heartbeat_timeout_s=5",
    "topology.join_timeout_s=15",
)
STEP_DELAY = {"DILOCO_TEST_STEP_DELAY_S": "0.08"}


# ---------------------------------------------------------------------------------- helpers
def launch(
    run_dir: Path,
    overrides: list[str],
    groups: int,
    shards: int = 1,
    elastic: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``diloco launch local`` in the background; its output goes to ``run_dir.launch.log``."""
    cmd = [
        sys.executable, "-m", "diloco", "launch", "local", "--groups", str(groups),
        "--shards", str(shards), *(["--elastic"] if elastic else []),
        *sets([*overrides, f"run.out_dir={run_dir}"]),
    ]  # fmt: skip
    log = open(f"{run_dir}.launch.log", "w")  # noqa: SIM115 - the child holds it
    return subprocess.Popen(cmd, env=child_env(env), stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 240) -> None:
    """Wait for the launcher; fail with its output unless it exited 0."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher stops the coordinator and every group
        proc.wait(timeout=30)
        raise
    assert rc == 0, Path(f"{run_dir}.launch.log").read_text()


def workers(proc: subprocess.Popen, groups: int) -> dict[int, list[int]]:
    """The training processes of each group (torchrun's agent excluded), by group id."""
    out: dict[int, list[int]] = {g: [] for g in range(groups)}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if " train " not in cmdline or "torch.distributed.run" in cmdline:
            continue
        for g in range(groups):
            if f"topology.group_id={g} " in cmdline + " ":
                out[g].append(child.pid)
    return out


def wait_until(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def last_step(run_dir: Path, group: int) -> int:
    path = run_dir / f"group{group}" / "metrics.jsonl"
    try:
        return max((r["step"] for r in read_metrics(path)), default=-1)
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def summary(run_dir: Path, group: int) -> dict:
    return json.loads((run_dir / f"group{group}" / "summary.json").read_text())


def final_theta(run_dir: Path, group: int | None = None) -> dict[str, torch.Tensor]:
    where = run_dir if group is None else run_dir / f"group{group}"
    return torch.load(where / "final_model.pt")


def assert_all_groups_hold_the_same_theta(run_dir: Path, groups: int) -> None:
    ref = final_theta(run_dir, 0)
    for g in range(1, groups):
        other = final_theta(run_dir, g)
        assert all(torch.equal(ref[k], other[k]) for k in ref), f"group {g}'s θ differs"
    sums = {(summary(run_dir, g)["theta_sum"], summary(run_dir, g)["theta_sumsq"]) for g in
            range(groups)}  # fmt: skip
    assert len(sums) == 1


def val_losses(metrics: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(metrics) if "val_loss" in r}


def elastic_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "elastic.json").read_text())


@dataclass
class FaultJob:
    """One fault test's job: its run directory, the launcher, and the group workers' PIDs at
    the start (by group id); ``error`` is what went wrong while driving it, if anything."""

    run_dir: Path
    proc: subprocess.Popen
    before: dict[int, list[int]]
    error: BaseException | None = None

    def result(self) -> FaultJob:
        if self.error is not None:
            raise self.error
        return self


def kill_inner(job: FaultJob) -> None:
    wait_until(lambda: last_step(job.run_dir, 1) >= 24, what="group 1 past its first checkpoint")
    os.kill(job.before[1][0], signal.SIGKILL)


def kill_in_exchange(job: FaultJob) -> None:
    marker = job.run_dir.parent / "markers" / "pause-g1-r8"
    wait_until(marker.exists, what="group 1 in the exchange")
    time.sleep(0.5)  # the others are inside the collective by now
    os.kill(job.before[1][0], signal.SIGKILL)


def stop_past_heartbeat_timeout(job: FaultJob) -> None:
    wait_until(lambda: last_step(job.run_dir, 1) >= 24, what="group 1 to reach step 24")
    os.kill(job.before[1][0], signal.SIGSTOP)
    time.sleep(10.0)
    os.kill(job.before[1][0], signal.SIGCONT)


def kill_coordinator(job: FaultJob) -> None:
    wait_until(lambda: last_step(job.run_dir, 0) >= 24, what="step 24")
    (coordinator,) = [
        c for c in psutil.Process(job.proc.pid).children() if c.cmdline()[3:4] == ["coordinator"]
    ]
    coordinator.kill()


#: The fault jobs by name: the fault each one suffers, and its extra environment.
FAULTS: dict[str, tuple[Callable[[FaultJob], None] | None, dict[str, str]]] = {
    "no_fault": (None, {}),
    "kill_inner": (kill_inner, {}),
    "kill_exchange": (kill_in_exchange, {"DILOCO_TEST_PAUSE_IN_EXCHANGE": "1:8"}),
    "stop": (stop_past_heartbeat_timeout, {}),
    "coordinator": (kill_coordinator, {}),
}


@pytest.fixture(scope="module")
def fault_jobs(tmp_path_factory) -> dict[str, FaultJob]:
    """Every fault test's job (and the no-fault reference), run side by side: each starts once
    the previous one trains (start-ups, the costly part, do not overlap), its fault is caused
    from a thread, and the launcher is waited for. Most of the jobs' wall time is the step
    delay's sleep, so running them together keeps the machine's load low."""
    root = tmp_path_factory.mktemp("faults")
    markers = {"DILOCO_TEST_MARKER_DIR": str(root / "markers")}
    (root / "markers").mkdir()
    jobs: dict[str, FaultJob] = {}
    with ThreadPoolExecutor(len(FAULTS)) as pool:
        for name, (fault, env) in FAULTS.items():
            run_dir = root / name
            proc = launch(run_dir, FAULT_RUN, GROUPS, env={**STEP_DELAY, **markers, **env})
            wait_until(lambda p=proc: all(workers(p, GROUPS).values()), what=f"{name}: groups")
            job = jobs[name] = FaultJob(run_dir, proc, workers(proc, GROUPS))
            wait_until(lambda d=run_dir: min(last_step(d, g) for g in range(GROUPS)) >= 0,
                       what=f"{name}: every group training")  # fmt: skip
            pool.submit(_drive, job, fault)
    return jobs


def _drive(job: FaultJob, fault: Callable[[FaultJob], None] | None) -> None:
    try:
        if fault is not None:
            fault(job)
        finish(job.proc, job.run_dir)
    except BaseException as e:  # reported by the test that reads this job
        job.error = e
        if job.proc.poll() is None:
            job.proc.terminate()


# ---------------------------------------------------------------------------------- no faults
@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 2])
def test_elastic_groups_give_the_mesh_paths_losses_and_weights(tmp_path, shards):
    """G = 2 elastic groups (each its own world of S ranks, meeting through the coordinator)
    train exactly like the (G, S) mesh job: the same val losses (≤ 1e-6) and final θ."""
    overrides = tiny_overrides(24, 4, "train.eval_every=8", "train.log_every=4")
    mesh, elastic = tmp_path / "mesh", tmp_path / "elastic"
    finish(launch(mesh, overrides, 2, shards, elastic=False), mesh)
    finish(launch(elastic, overrides, 2, shards), elastic)
    want = val_losses(mesh / "metrics.jsonl")
    assert sorted(want) == [0, 8, 16, 24]
    for g in range(2):
        got = val_losses(elastic / f"group{g}" / "metrics.jsonl")
        assert sorted(got) == sorted(want)
        assert all(abs(got[s] - want[s]) <= 1e-6 for s in want), (got, want)
        theta = final_theta(elastic, g)
        for k, v in final_theta(mesh).items():
            torch.testing.assert_close(theta[k], v, rtol=0, atol=1e-6)
        assert summary(elastic, g)["rounds_below_groups"] == 0


# ---------------------------------------------------------------------------------- faults
def assert_close_to_the_no_fault_run(run_dir: Path, fault_jobs: dict[str, FaultJob]) -> None:
    loss = summary(run_dir, 0)["final_val_loss"]
    reference = summary(fault_jobs["no_fault"].result().run_dir, 0)["final_val_loss"]
    assert abs(loss - reference) <= FAULT_TOLERANCE


@pytest.mark.slow
def test_a_group_killed_during_its_inner_steps_restarts_alone_and_heals(fault_jobs):
    """SIGKILL group 1 mid-round: groups 0 and 2 keep their processes and carry on without it;
    the launcher restarts group 1, which resumes its own checkpoint, heals θ from a live group
    and rejoins; every group ends with the same θ."""
    job = fault_jobs["kill_inner"].result()
    run_dir = job.run_dir
    for g in (0, 2):
        assert summary(run_dir, g)["pids"] == job.before[g]
        assert summary(run_dir, g)["rounds_below_groups"] > 0
        assert summary(run_dir, g)["exchanges_redone"] == 0
    report = elastic_report(run_dir)
    assert [g["restarts"] for g in report["groups"]] == [0, 1, 0]
    (recovery,) = report["groups"][1]["recoveries"]
    assert recovery["recovery_s"] > 0 and recovery["heal_bytes"] > 0
    assert summary(run_dir, 1)["healed_self"]
    assert_all_groups_hold_the_same_theta(run_dir, GROUPS)
    assert_close_to_the_no_fault_run(run_dir, fault_jobs)


@pytest.mark.slow
def test_a_group_killed_inside_the_exchange_is_redone_by_the_survivors(fault_jobs):
    """Group 1 is stopped inside round 8's exchange (the others waiting on it) and SIGKILLed:
    the survivors' collective fails, they re-form without it and redo the average from their
    own Δ — the round is not lost — and group 1 comes back and heals."""
    job = fault_jobs["kill_exchange"].result()
    run_dir = job.run_dir
    for g in (0, 2):
        s = summary(run_dir, g)
        assert s["pids"] == job.before[g]
        assert s["exchanges_redone"] >= 1
        assert s["rounds"] == 240 // 4  # no round lost
    assert [g["restarts"] for g in elastic_report(run_dir)["groups"]] == [0, 1, 0]
    assert summary(run_dir, 1)["healed_self"]
    assert_all_groups_hold_the_same_theta(run_dir, GROUPS)
    assert_close_to_the_no_fault_run(run_dir, fault_jobs)


@pytest.mark.slow
def test_a_group_stopped_past_the_heartbeat_timeout_is_dropped_then_heals(fault_jobs):
    """SIGSTOP group 1 for twice the heartbeat timeout: the others drop it and keep training; after
    SIGCONT it finds itself behind, heals from a live group and rejoins — the same process,
    nothing corrupted (every group ends with the same θ)."""
    job = fault_jobs["stop"].result()
    run_dir = job.run_dir
    assert [g["restarts"] for g in elastic_report(run_dir)["groups"]] == [0, 0, 0]
    assert [summary(run_dir, g)["pids"] for g in range(GROUPS)] == [job.before[g] for g in
                                                                     range(GROUPS)]  # fmt: skip
    assert summary(run_dir, 0)["rounds_below_groups"] > 0
    assert summary(run_dir, 1)["healed_self"]
    assert_all_groups_hold_the_same_theta(run_dir, GROUPS)
    assert_close_to_the_no_fault_run(run_dir, fault_jobs)


@pytest.mark.slow
def test_the_coordinator_killed_mid_run_costs_nothing(fault_jobs):
    """SIGKILL the coordinator: the groups keep their membership while it is away (the launcher
    restarts it on the same address) and the run is exactly the no-fault run."""
    run_dir = fault_jobs["coordinator"].result().run_dir
    report = elastic_report(run_dir)
    assert report["coordinator_restarts"] == 1
    assert [g["restarts"] for g in report["groups"]] == [0, 0, 0]
    assert all(summary(run_dir, g)["rounds_below_groups"] == 0 for g in range(GROUPS))
    ref = final_theta(fault_jobs["no_fault"].result().run_dir, 0)
    got = final_theta(run_dir, 0)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert_all_groups_hold_the_same_theta(run_dir, GROUPS)


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port pair")


def _coordinator(port: int, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "diloco", "coordinator", "--bind", f"127.0.0.1:{port}",
           *sets(overrides)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, text=True)
    assert "coordinator on" in proc.stdout.readline()
    return proc


def _group(run_dir: Path, port: int, group: int, overrides: list[str]) -> subprocess.Popen:
    elastic = [
        "topology.elastic=true",
        f"topology.group_id={group}",
        f"topology.coordinator=127.0.0.1:{port}",
        f"run.out_dir={run_dir}",
    ]
    cmd = [sys.executable, "-m", "diloco", "train", *sets([*overrides, *elastic])]
    return subprocess.Popen(
        cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_too_few_groups_wait_up_to_the_quorum_timeout_then_stop_with_one_line(tmp_path):
    """min_groups = 2 with one group running: it waits topology.quorum_timeout_s at its first
    round boundary, then exits 2 with one line naming the setting."""
    overrides = tiny_overrides(40, 4, "topology.groups=2", "topology.min_groups=2",
                               "topology.join_timeout_s=1", "topology.heartbeat_timeout_s=1",
                               "topology.quorum_timeout_s=4")  # fmt: skip
    port = _free_port_pair()
    coordinator = _coordinator(port, overrides)
    try:
        t0 = time.monotonic()
        out, err = _group(tmp_path / "run", port, 0, overrides).communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        coordinator.terminate()
        coordinator.wait()
    lines = [line for line in err.splitlines() if line.startswith("diloco: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "topology.min_groups=2" in lines[0] and "topology.quorum_timeout_s=4" in lines[0]
    assert waited >= 4


@pytest.mark.slow
def test_a_second_process_claiming_a_group_id_is_refused_with_one_line(tmp_path):
    """Two processes started as topology.group_id=0: the later one is refused with one line
    (exit 2); the first trains on."""
    overrides = tiny_overrides(24, 4, "topology.groups=2", "topology.join_timeout_s=2",
                               "topology.heartbeat_timeout_s=1")  # fmt: skip
    port = _free_port_pair()
    coordinator = _coordinator(port, overrides)
    try:
        first = _group(tmp_path / "a", port, 0, overrides)
        time.sleep(1.0)
        second = _group(tmp_path / "b", port, 0, overrides)
        _, err = second.communicate(timeout=120)
        first_out, first_err = first.communicate(timeout=120)
    finally:
        coordinator.terminate()
        coordinator.wait()
    assert second.returncode == 2
    (line,) = [line for line in err.splitlines() if line.startswith("diloco: error:")]
    assert "topology.group_id=0" in line and "Traceback" not in err
    assert first.returncode == 0, first_err


# ---------------------------------------------------------------------------------- roles
def _member(group: int, round: int, started: float = 0.0, fingerprint: str = "f") -> Member:
    return Member(group, round, round > 0, f"g{group}:{started}", started, fingerprint)


def test_members_behind_the_highest_round_heal_from_the_current_ones_in_turn():
    q = Quorum(7, "e", tuple(_member(g, r) for g, r in enumerate([5, 3, 5, 0, 5])), index=0)
    assert q.current == [0, 2, 4] and q.behind == [1, 3]
    assert [q.donor_of(j) for j in q.behind] == [0, 2]


def test_a_fresh_group_is_current_only_when_every_group_is_fresh():
    fresh = Quorum(1, "e", (_member(0, 0), _member(1, 0)), index=0)
    assert fresh.current == [0, 1] and fresh.behind == []
    joined = Quorum(2, "e", (_member(0, 0), _member(1, 4)), index=0)
    assert joined.current == [1] and joined.behind == [0]


def test_two_thetas_at_one_round_are_settled_by_a_vote_of_lineages():
    """An exchange completed on group 2 while groups 0 and 1, taking a member for dead, redid
    the round without it: two θ of round 5. The lineage most members hold wins; the others
    heal (a tie goes to the lineage of the lowest group id)."""
    import dataclasses

    m = [dataclasses.replace(_member(g, 5), lineage=lin) for g, lin in enumerate("bba")]
    q = Quorum(3, "e", tuple(m), index=0)
    assert q.current == [0, 1] and q.behind == [2]
    tie = Quorum(3, "e", (m[2], dataclasses.replace(m[1], group=4)), index=0)
    assert [tie.members[i].lineage for i in tie.current] == ["a"]


def test_a_duplicate_group_id_refuses_the_later_process_and_keeps_the_first():
    admitted, refused = admit([_member(0, 3, started=2.0), _member(0, 3, started=1.0),
                               _member(1, 3, started=1.5)])  # fmt: skip
    assert [(m.group, m.started) for m in admitted] == [(0, 1.0), (1, 1.5)]
    assert list(refused) == ["g0:2.0"] and "group_id=0" in refused["g0:2.0"]


def test_a_group_with_another_config_is_refused_by_the_majority():
    admitted, refused = admit([_member(0, 3, 1.0, "a"), _member(1, 3, 2.0, "b"),
                               _member(2, 3, 3.0, "a")])  # fmt: skip
    assert [m.group for m in admitted] == [0, 2] and "config differs" in refused["g1:2.0"]
    tie_admitted, _ = admit([_member(0, 3, 2.0, "a"), _member(1, 3, 1.0, "b")])
    assert [m.group for m in tie_admitted] == [1]  # a tie: the earliest-started group's wins


# ---------------------------------------------------------------------------------- config
ELASTIC = ["topology.elastic=true", "topology.groups=2", "topology.group_id=1",
           "topology.coordinator=127.0.0.1:29510"]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["topology.elastic=true", "topology.groups=2"], "needs topology.group_id"),
        ([*ELASTIC, "topology.group_id=2"], "topology.group_id=2 must be in 0..1"),
        ([*ELASTIC, "topology.coordinator=nohost"], "topology.coordinator='nohost' must be"),
        ([*ELASTIC, "topology.min_groups=3"], "topology.min_groups (3) must be <="),
        ([*ELASTIC, "topology.quorum_timeout_s=5"], "quorum_timeout_s (5) must be >"),
        ([*ELASTIC, "outer.fragments=2"], "outer.fragments=2 (streaming) is not supported"),
        ([*ELASTIC, "inner.engine=deepspeed"], "inner.engine=deepspeed is not supported"),
        (["topology.group_id=1"], "topology.elastic is false"),
    ],
)
def test_elastic_settings_are_checked_with_one_line(overrides, expected):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)
