"""``diloco launch local``: a whole job on this machine, and the supervisor of elastic groups.

Without ``--elastic``: one ``torchrun`` of G·S processes (the mesh job), its output on this
terminal. With ``--elastic`` (``topology.elastic=true``):

* the coordinator (``python -m diloco coordinator``) on a free loopback port, restarted on the same
  port if it dies;
* one process tree per worker group (``torchrun --nproc-per-node S``; a plain process when S = 1),
  each in its own session so a group can be stopped as a whole, with stdout and stderr appended to
  ``RUN_DIR/logs/group<g>.log`` (a header line per start);
* a group that exits with an error is restarted, up to ``--restarts`` times per group; it resumes
  from its own newest checkpoint and heals from a live group. The other groups are never touched.

When every group has exited the supervisor stops the coordinator, writes ``RUN_DIR/elastic.json``
(each group's starts, exits and recovery times: death → healed back into the quorum, read from the
restarted group's metrics) and prints one line. Exit status: 0 when every group finished, 1 when
one gave up after its restarts (the others' outputs are kept), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from diloco.errors import ConfigError, DilocoError, note
from diloco.files import write_text_atomic
from diloco.job.elastic import heal_records
from diloco.launchers.local import child_env, free_port, free_port_pair, torchrun_cmd

__all__ = ["GroupProcess", "Supervisor", "add_arguments", "run_from_args"]


@dataclass
class _Start:
    pid: int
    started: float
    ended: float | None = None
    returncode: int | None = None


@dataclass
class GroupProcess:
    """One worker group's process tree and its history."""

    group: int
    cmd: list[str]
    log_path: Path
    starts: list[_Start] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log: IO | None = None

    @property
    def restarts(self) -> int:
        return max(0, len(self.starts) - 1)

    def start(self, env: dict[str, str]) -> None:
        self.log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in reap
        n = len(self.starts)
        self.log.write(
            f"==== diloco launch local: group {self.group} start {n + 1} at "
            f"{time.strftime('%H:%M:%S')} ====\n"
        )
        self.log.flush()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.starts.append(_Start(pid=self.proc.pid, started=time.time()))

    def poll(self) -> int | None:
        """The exit status if the tree's main process has exited (then it is reaped)."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            return None
        self.starts[-1].ended, self.starts[-1].returncode = time.time(), rc
        self.kill(signal.SIGKILL)  # what torchrun may have left behind
        self.proc = None
        self.log.close()
        return rc

    def kill(self, sig: int) -> None:
        if self.proc is not None or self.starts:
            try:
                os.killpg(self.starts[-1].pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


class Supervisor:
    """Runs and watches an elastic job's coordinator and groups (module docstring).

    Args:
        run_dir: ``run.out_dir`` (logs and elastic.json go here).
        train_args: the arguments after ``diloco train`` shared by every group (``--config F``,
            ``--set …``, including the topology overrides).
        groups, shards: G and S.
        restarts: restarts allowed per group.
        env: the children's environment.
        coordinator_args: the arguments after ``diloco coordinator`` except ``--bind``.
    """

    def __init__(
        self,
        run_dir: Path,
        train_args: list[str],
        groups: int,
        shards: int,
        restarts: int,
        env: dict[str, str],
        coordinator_args: list[str],
    ):
        self.run_dir = Path(run_dir)
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.restarts = restarts
        self.env = env
        self.port = free_port_pair()
        self.address = f"127.0.0.1:{self.port}"
        py = sys.executable
        self.coordinator = GroupProcess(
            -1,
            [py, "-m", "diloco", "coordinator", "--bind", self.address, *coordinator_args],
            self.logs / "coordinator.log",
        )
        self.groups: list[GroupProcess] = []
        for g in range(groups):
            target = [
                "-m",
                "diloco",
                "train",
                *train_args,
                "--set",
                f"topology.group_id={g}",
                "--set",
                f"topology.coordinator={self.address}",
            ]
            if shards == 1:
                cmd = [py, *target]
            else:
                cmd = [
                    py,
                    "-m",
                    "torch.distributed.run",
                    "--nproc-per-node",
                    str(shards),
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    "{port}",
                    *target,
                ]
            self.groups.append(GroupProcess(g, cmd, self.logs / f"group{g}.log"))

    def _start(self, gp: GroupProcess) -> None:
        template = gp.cmd
        gp.cmd = [a.replace("{port}", str(free_port())) for a in template]
        gp.start(self.env)
        gp.cmd = template

    def run(self) -> int:
        """Start everything, supervise until every group has exited; the exit status."""
        finished: dict[int, int] = {}
        signal.signal(signal.SIGTERM, _interrupt)  # stopped from outside: stop every group too
        self._start(self.coordinator)
        self._wait_for_coordinator()
        for gp in self.groups:
            self._start(gp)
        try:
            while len(finished) < len(self.groups):
                time.sleep(0.2)
                if self.coordinator.poll() is not None:
                    note(
                        f"coordinator exited (status {self.coordinator.starts[-1].returncode}); "
                        f"restarting it on {self.address}"
                    )
                    self._start(self.coordinator)
                for gp in self.groups:
                    if gp.group in finished:
                        continue
                    rc = gp.poll()
                    if rc is None:
                        continue
                    if rc == 0 or gp.restarts >= self.restarts:
                        finished[gp.group] = rc
                        if rc:
                            note(
                                f"group {gp.group} failed {len(gp.starts)} times (last exit "
                                f"status {rc}, see {gp.log_path}); giving up on it after "
                                f"--restarts {self.restarts}"
                            )
                        continue
                    note(
                        f"group {gp.group} exited with status {rc}; restart "
                        f"{gp.restarts + 1} of {self.restarts} (log: {gp.log_path})"
                    )
                    self._start(gp)
        except KeyboardInterrupt:
            self._stop_all()
            self._write_report(finished)
            return 130
        self._stop_all()
        report = self._write_report(finished)
        failed = sorted(g for g, rc in finished.items() if rc)
        if failed:
            done = sorted(set(finished) - set(failed))
            others = f"groups {done} finished" if done else "no group finished"
            note(
                f"groups {failed} gave up after --restarts {self.restarts}; {others} "
                f"(outputs and logs in {self.run_dir})"
            )
            return 1
        note(
            f"all {len(self.groups)} groups finished; restarts: "
            f"{ {g['group']: g['restarts'] for g in report['groups']} }; outputs in {self.run_dir}"
        )
        return 0

    def _wait_for_coordinator(self, timeout_s: float = 60.0) -> None:
        import socket

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                raise DilocoError(f"the coordinator did not start; see {self.coordinator.log_path}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", self.port + 1)) == 0:
                    return
            time.sleep(0.1)
        raise DilocoError(
            f"the coordinator did not listen within {timeout_s:g} s; see "
            f"{self.coordinator.log_path}"
        )

    def _stop_all(self) -> None:
        for gp in [*self.groups, self.coordinator]:
            if gp.proc is not None:
                gp.kill(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for gp in [*self.groups, self.coordinator]:
            while gp.proc is not None and gp.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if gp.proc is not None:
                gp.kill(signal.SIGKILL)
                gp.poll()

    def _write_report(self, finished: dict[int, int]) -> dict:
        groups = []
        for gp in self.groups:
            heals = heal_records(self.run_dir / f"group{gp.group}" / "metrics.jsonl")
            recoveries = []
            for death, restart in zip(gp.starts[:-1], gp.starts[1:], strict=True):
                healed = next((h for h in heals if h["healed_at"] >= restart.started), None)
                recoveries.append(
                    {
                        "died_at": death.ended,
                        "restarted_at": restart.started,
                        "back_in_quorum_at": healed["healed_at"] if healed else None,
                        "recovery_s": healed["healed_at"] - death.ended if healed else None,
                        "heal_bytes": healed.get("heal_bytes") if healed else None,
                    }
                )
            groups.append(
                {
                    "group": gp.group,
                    "restarts": gp.restarts,
                    "exit": finished.get(gp.group),
                    "starts": [asdict(s) for s in gp.starts],
                    "recoveries": recoveries,
                }
            )
        report = {
            "coordinator": self.address,
            "coordinator_restarts": self.coordinator.restarts,
            "groups": groups,
        }
        write_text_atomic(self.run_dir / "elastic.json", json.dumps(report, indent=2) + "\n")
        return report


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``diloco launch local`` (besides --config/--set)."""
    p.add_argument("--groups", type=int, required=True, metavar="G", help="worker groups")
    p.add_argument("--shards", type=int, default=1, metavar="S", help="ranks per group")
    p.add_argument(
        "--elastic",
        action="store_true",
        help="one process tree per group and a coordinator; failed groups restart alone",
    )
    p.add_argument(
        "--restarts",
        type=int,
        default=3,
        metavar="N",
        help="--elastic: restarts allowed per group (default: %(default)s)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """``diloco launch local``: the mesh job under one torchrun, or an elastic job (module
    :mod:`diloco.launchers.supervisor`)."""
    from diloco.config import load_config

    G, S = args.groups, args.shards
    if G < 1 or S < 1 or args.restarts < 0:
        raise ConfigError(
            f"--groups {G} --shards {S} --restarts {args.restarts}: groups and shards must be "
            ">= 1 and restarts >= 0"
        )
    sets = [f"topology.groups={G}", f"topology.shards={S}"]
    shared = ([] if args.config is None else ["--config", args.config]) + [
        a for o in [*args.overrides, *sets] for a in ("--set", o)
    ]
    threads = str(max(1, (os.cpu_count() or 1) // (G * S)))
    env = child_env(
        {
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
            "PYTHONUNBUFFERED": "1",
            "RUST_LOG": os.environ.get("RUST_LOG", "warn"),
        }
    )
    if not args.elastic:
        load_config(args.config, [*args.overrides, *sets])  # one-line errors before launching
        target = ["-m", "diloco", "train", *shared]
        cmd = [sys.executable, *target] if G * S == 1 else torchrun_cmd(G * S, *target)
        return subprocess.run(cmd, env=env).returncode
    elastic = ["topology.elastic=true"]
    probe = [*args.overrides, *sets, *elastic, "topology.group_id=0",
             "topology.coordinator=127.0.0.1:1"]  # fmt: skip
    cfg = load_config(args.config, probe)  # one-line errors before anything starts
    supervisor = Supervisor(
        run_dir=Path(cfg.run.out_dir),
        train_args=[*shared, "--set", elastic[0]],
        groups=G,
        shards=S,
        restarts=args.restarts,
        env=env,
        coordinator_args=shared,
    )
    return supervisor.run()
