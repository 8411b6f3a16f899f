"""A run directory belongs to one run: never shared by two jobs, never overwritten by accident.

* :func:`check_out_dir`: ``run.out_dir`` must be a directory of its own, not ``/``, a top-level
  directory or the home directory (unless it already holds a run).
* :class:`RunLock`: the job's main rank holds ``RUN_DIR/.diloco.lock`` for the run's lifetime:
  JSON with pid, host and start time, created atomically (``os.link``: exactly one of two jobs
  gets it). A second job is refused with one line naming the holder. The holder refreshes the
  file's modification time every :data:`HEARTBEAT_S`; a lock is *stale*, and taken over with a
  note, when its pid no longer runs on this host, or (held from another host) when it has not
  been refreshed for :data:`STALE_S`. The lock is per directory: elastic groups writing into
  ``RUN_DIR/group<g>/`` each lock their own.
* :func:`guard_finished`: a directory holding a finished run (``summary.json``) is not trained
  into again unless the run continues from a checkpoint to more steps, or ``--force`` (the old
  outputs are then moved to ``RUN_DIR/replaced-<time>/``, not deleted).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from diloco.errors import ConfigError, DilocoError, note

__all__ = [
    "HEARTBEAT_S",
    "LOCK_NAME",
    "OUTPUTS",
    "STALE_S",
    "RunDirError",
    "RunLock",
    "check_out_dir",
    "guard_finished",
]

LOCK_NAME = ".diloco.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
#: What a run writes into its directory besides ``checkpoints/`` (moved aside by ``--force``).
OUTPUTS = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "final_model.pt",
    "tensorboard",
    "wandb",
)


class RunDirError(DilocoError):
    """The run directory is in use, holds a finished run, or is no place for a run."""


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Refuse ``/``, a top-level directory (``/etc``) or the home directory as ``run.out_dir``
    unless it already holds a run: a run writes its files into the directory itself. A leading
    ``~`` is refused too: nothing expands it in ``--set`` or a config file."""
    if str(out_dir).startswith("~"):
        raise ConfigError(
            f"run.out_dir={str(out_dir)!r} starts with '~', which is not expanded inside --set "
            f"or a config file; give the full path, e.g. {Path(out_dir).expanduser()}"
        )
    path = Path(out_dir).absolute()
    resolved = Path(os.path.realpath(path))
    if (resolved / "config.yaml").exists() or (resolved / "metrics.jsonl").exists():
        return
    home = Path(os.path.realpath(Path.home()))
    if resolved == home:
        where = "your home directory"
    elif len(resolved.parts) <= 2:
        where = "the root directory" if resolved.parent == resolved else "a top-level directory"
    else:
        return
    raise ConfigError(
        f"run.out_dir={str(out_dir)!r} is {where}; a run writes its files into run.out_dir "
        "itself, so give it a directory of its own, e.g. run.out_dir=runs/NAME"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """``RUN_DIR/.diloco.lock``, held from :meth:`acquire` to :meth:`release` (see module doc)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock (a stale one with a note), or raise RunDirError naming its holder."""
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}")
        tmp.write_text(json.dumps(self.info) + "\n")
        try:
            for _ in range(3):  # a stale lock removed by another job in between: try again
                try:
                    os.link(tmp, self.path)  # atomic: fails if the lock exists
                    break
                except FileExistsError:
                    self._take_over_if_stale()
            else:
                raise RunDirError(f"cannot take the lock {self.path}; try again")
        finally:
            tmp.unlink()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Give the lock up (only if it is still this process's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._holder() == self.info:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile
        who = _describe(holder)
        if holder is None:
            stale = age > STALE_S  # a lock that was never completely written
        elif holder.get("host") == self.info["host"]:
            stale = not _alive(int(holder.get("pid", -1)))
        else:
            stale = age > STALE_S
        if not stale:
            raise RunDirError(
                f"run directory {self.path.parent} is in use by {who} (lock {self.path}, "
                f"refreshed {age:.0f} s ago); wait for it to finish, choose another "
                f"run.out_dir, or delete {self.path} if that job is gone"
            )
        note(f"taking over the stale lock of {who}, which is no longer running")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a job whose lock file is unreadable"
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def guard_finished(
    run_dir: str | os.PathLike, continues: bool, force: bool, is_main: bool = True
) -> None:
    """Refuse to train into a directory holding a finished run unless ``continues`` (a
    checkpoint there is resumed towards more steps) or ``force`` (then rank 0 moves the old
    outputs to ``replaced-<time>/``). Every rank calls it and takes the same decision."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if continues or not summary.is_file():
        return
    if not force:
        raise RunDirError(
            f"run directory {run_dir} already holds a finished run ({_finished(summary)}); "
            "choose another run.out_dir, raise train.steps to continue it from its last "
            "checkpoint, or add --force to start over (its outputs are moved aside)"
        )
    if is_main:
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for name in OUTPUTS:
            if (run_dir / name).exists():
                (run_dir / name).rename(aside / name)
        note(f"--force: moved the finished run's outputs to {aside}")


def _finished(summary: Path) -> str:
    """``800 steps, final val loss 1.2345, 2026-12-06 20:41`` from a run's summary.json."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.stat().st_mtime))
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
        return f"{data['steps']} steps, final val loss {data['final_val_loss']:.4f}, {when}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"summary.json of {when}"
