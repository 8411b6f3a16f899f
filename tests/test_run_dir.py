"""Specification of run directories (issue 15, class 1): one run per directory, never
overwritten or shared by accident. Two jobs are real processes; a crash is a SIGKILL."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import sets, tiny_overrides

from diloco import cli
from diloco.errors import DilocoError
from diloco.launchers.local import child_env
from diloco.persist import rundir
from diloco.persist.rundir import LOCK_NAME, RunLock


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    text = (Path(cli.__file__).parent / "job" / "train.py").read_text()
    path.write_text(text * 2)
    return path


def overrides(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        8, 4, f"data.source=text:{corpus(tmp_path)}", f"run.out_dir={out}", *extra
    )


def train(tmp_path: Path, out: Path, *extra: str, args: tuple[str, ...] = ()) -> tuple[int, str]:
    """``diloco train`` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["train", *sets(overrides(tmp_path, out, *extra)), *args])
    return rc, err.getvalue()


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _ctrl_c_reaches_the_child() -> None:
    """SIGINT back to its default, as in a terminal's foreground job: a test run started in
    the background of a script inherits SIGINT ignored, and so would its children."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_job(tmp_path: Path, out: Path, steps: int) -> subprocess.Popen:
    """``python -m diloco train`` of ``steps`` steps in a child process."""
    args = sets(overrides(tmp_path, out, f"train.steps={steps}"))
    cmd = [sys.executable, "-m", "diloco", "train", *args]
    return subprocess.Popen(
        cmd,
        env=child_env(),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_reaches_the_child,
    )


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# --- a finished run ------------------------------------------------------------------------------


def test_rerun_into_a_finished_run_without_checkpoints_is_refused_naming_it(tmp_path):
    out = tmp_path / "run"
    assert train(tmp_path, out)[0] == 0
    before = digest(out)
    rc, err = train(tmp_path, out)
    assert rc == 2
    assert err.splitlines() == [
        f"diloco: error: run directory {out} already holds a finished run "
        + err.split("finished run ", 1)[1].strip()
    ]
    assert "(8 steps, final val loss " in err and "add --force to start over" in err
    assert digest(out) == before


def test_force_moves_the_finished_runs_outputs_aside_and_starts_over(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, out)
    before = digest(out)
    rc, err = train(tmp_path, out, args=("--force",))
    assert rc == 0 and "moved the finished run's outputs to" in err
    (aside,) = out.glob("replaced-*")
    assert digest(aside) == before
    assert (out / "summary.json").is_file()


def test_finished_run_with_checkpoints_continues_to_more_steps(tmp_path):
    out = tmp_path / "run"
    assert train(tmp_path, out, "train.checkpoint_every=1")[0] == 0
    rc, _ = train(tmp_path, out, "train.checkpoint_every=1", "train.steps=12")
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_finished_run_at_its_last_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, out, "train.checkpoint_every=1")
    before = digest(out)
    rc, err = train(tmp_path, out, "train.checkpoint_every=1")
    assert rc == 2 and "already holds a finished run" in err
    assert digest(out) == before


def test_unfinished_run_without_checkpoints_starts_over_as_a_restarted_job_must(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, out)
    (out / "summary.json").unlink()  # as if the job was killed before its end
    assert train(tmp_path, out)[0] == 0


# --- places that are no run directory ------------------------------------------------------------


@pytest.mark.parametrize(
    ("out_dir", "where"),
    [("/", "the root directory"), ("/etc", "a top-level directory"), (None, "your home directory")],
    ids=["root", "top-level", "home"],
)
def test_out_dir_that_is_no_directory_of_its_own_is_refused(out_dir, where):
    out_dir = out_dir or str(Path.home())
    with pytest.raises(DilocoError, match=rf"run.out_dir='{out_dir}' is {where}; .*runs/NAME"):
        rundir.check_out_dir(out_dir)


def test_out_dir_with_a_tilde_is_refused_with_the_expanded_path():
    expanded = Path("~/runs/x").expanduser()
    with pytest.raises(DilocoError, match=rf"starts with '~'.*e\.g\. {expanded}$"):
        rundir.check_out_dir("~/runs/x")


def test_run_directories_below_top_level_are_accepted(tmp_path):
    rundir.check_out_dir(tmp_path / "runs" / "x")


def test_refused_run_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "new"
    rc, _ = train(tmp_path, out, "data.source=text:missing.txt")
    assert rc == 2 and not out.exists()


# --- the lock ------------------------------------------------------------------------------------


def test_second_job_into_a_busy_run_dir_refuses_in_one_line_and_the_first_finishes(tmp_path):
    out = tmp_path / "run"
    first = start_job(tmp_path, out, steps=16)
    try:
        wait_for(out / LOCK_NAME)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run
        try:
            rc, err = train(tmp_path, out)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert rc == 2
        assert err.splitlines() == [
            f"diloco: error: run directory {out} is in use by pid {first.pid} on "
            + err.split(f"pid {first.pid} on ", 1)[1].strip()
        ]
        assert first.wait(timeout=240) == 0, first.stderr.read()
    finally:
        first.kill()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # one job's records only
    assert not (out / LOCK_NAME).exists()


def test_lock_of_a_killed_job_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "run"
    first = start_job(tmp_path, out, steps=10_000)
    wait_for(out / LOCK_NAME)
    first.kill()
    first.wait()
    rc, err = train(tmp_path, out)
    assert rc == 0
    assert f"diloco: taking over the stale lock of pid {first.pid} on" in err
    assert not (out / LOCK_NAME).exists()


def write_lock(run_dir: Path, pid: int, host: str, age_s: float = 0.0) -> Path:
    path = run_dir / LOCK_NAME
    info = {"pid": pid, "host": host, "started": "2026-01-01 00:00:00"}
    path.write_text(json.dumps(info))
    mtime = time.time() - age_s
    os.utime(path, (mtime, mtime))
    return path


def test_lock_held_from_another_host_is_respected_while_refreshed(tmp_path):
    write_lock(tmp_path, 1, "elsewhere", age_s=10)
    with pytest.raises(DilocoError, match=r"is in use by pid 1 on elsewhere .*refreshed 10 s ago"):
        RunLock(tmp_path).acquire()


def test_lock_from_another_host_that_stopped_refreshing_is_stale(tmp_path, capsys):
    write_lock(tmp_path, 1, "elsewhere", age_s=rundir.STALE_S + 60)
    lock = RunLock(tmp_path).acquire()
    lock.release()
    assert "taking over the stale lock of pid 1 on elsewhere" in capsys.readouterr().err


def test_lock_records_pid_host_and_start_and_is_refreshed(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path).acquire()
    path = tmp_path / LOCK_NAME
    held = json.loads(path.read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert time.strptime(held["started"], "%Y-%m-%d %H:%M:%S")
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert path.stat().st_mtime > time.time() - 5
    lock.release()
    assert not path.exists()


def test_each_run_directory_has_its_own_lock(tmp_path):
    """Elastic groups write into RUN/group<g>/: each is a run directory of its own."""
    locks = [RunLock(tmp_path).acquire()]
    for sub in ("group0", "group1"):
        (tmp_path / sub).mkdir()
        locks.append(RunLock(tmp_path / sub).acquire())
    for lock in locks:
        lock.release()


def test_release_leaves_a_lock_taken_over_by_another_job(tmp_path):
    lock = RunLock(tmp_path).acquire()
    other = write_lock(tmp_path, 1, "elsewhere")
    lock.release()
    assert other.exists()


def test_ctrl_c_exits_130_with_one_line_and_releases_the_run_dir(tmp_path):
    out = tmp_path / "run"
    job = start_job(tmp_path, out, steps=10_000)
    try:
        wait_for(out / "metrics.jsonl")  # training has started
        job.send_signal(signal.SIGINT)
        assert job.wait(timeout=120) == 130
    finally:
        job.kill()
    assert job.stderr.read().splitlines()[-1] == "diloco: interrupted"
    assert not (out / LOCK_NAME).exists()
    assert not list(out.glob("*.tmp*"))
