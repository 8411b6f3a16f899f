"""Test-only fault injection, switched on by environment variables. Never set them in real runs.

:func:`install_from_env` (called once at the start of every training job,
:func:`diloco.job.train.train`) installs :func:`observe` as an observer of the job's events
(:mod:`diloco.job.events`) when any of these variables is set, and does nothing otherwise:

``DILOCO_TEST_NAN_AT_STEP=n[,m,...]``
    After the backward pass of inner step n, fill this rank's shard of the first parameter with
    NaN. Pick n at the last step of a round (n % K == 0): the inner optimiser state stays finite,
    the round's pseudo-gradient is NaN, so the outer step is skipped and the fast weights go back
    to the round's start point. Consecutive rounds' last steps exercise ``train.max_bad_rounds``.
``DILOCO_TEST_KILL_AT_STEP=n``
    SIGKILL this process after the backward pass of inner step n, on rank
    ``DILOCO_TEST_KILL_RANK`` (default: the last rank), on the first attempt only
    (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a ``torchrun --max-restarts`` job recovers.
``DILOCO_TEST_CRASH_BEFORE_RENAME=n``
    ``os._exit(1)`` on rank 0 once checkpoint ``step_n.tmp/`` is complete (meta.json written)
    but before it is renamed to ``step_n/``: a crash in the middle of a checkpoint write.
``DILOCO_TEST_RAY_EXIT_AFTER_ROUND=n``
    Under ``diloco launch ray``: ``os._exit(1)`` on rank ``DILOCO_TEST_KILL_RANK`` (default: the
    last rank) right after the checkpoint that ends round n has been reported to Ray, on the
    first attempt only (the launcher counts attempts in the run directory), so Ray's
    ``FailureConfig(max_failures)`` restarts the job.

``DILOCO_TEST_STEP_DELAY_S=x``
    Sleep x seconds after every backward pass: a long run in wall time that leaves the CPU to
    the other processes (the elastic fault tests kill, stop and restart groups mid-run).
``DILOCO_TEST_PAUSE_IN_EXCHANGE=g:r``
    Elastic runs: group g stops inside the exchange of round r (after the quorum, before the
    collectives, every member of the round waiting for it) and sleeps until killed; it first
    creates ``$DILOCO_TEST_MARKER_DIR/pause-g<g>-r<r>``, which the test waits for before sending
    SIGKILL from outside. Once the marker exists the pause is not repeated (a restarted group
    passes).

The variables are read when an event happens, so a test may set or clear them between runs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from diloco.job import events

NAN_AT_STEP = "DILOCO_TEST_NAN_AT_STEP"
KILL_AT_STEP = "DILOCO_TEST_KILL_AT_STEP"
KILL_RANK = "DILOCO_TEST_KILL_RANK"
CRASH_BEFORE_RENAME = "DILOCO_TEST_CRASH_BEFORE_RENAME"
RAY_EXIT_AFTER_ROUND = "DILOCO_TEST_RAY_EXIT_AFTER_ROUND"
STEP_DELAY_S = "DILOCO_TEST_STEP_DELAY_S"
PAUSE_IN_EXCHANGE = "DILOCO_TEST_PAUSE_IN_EXCHANGE"
MARKER_DIR = "DILOCO_TEST_MARKER_DIR"
VARIABLES = (
    NAN_AT_STEP,
    KILL_AT_STEP,
    KILL_RANK,
    CRASH_BEFORE_RENAME,
    RAY_EXIT_AFTER_ROUND,
    STEP_DELAY_S,
    PAUSE_IN_EXCHANGE,
)

__all__ = [
    "CRASH_BEFORE_RENAME",
    "KILL_AT_STEP",
    "KILL_RANK",
    "MARKER_DIR",
    "NAN_AT_STEP",
    "PAUSE_IN_EXCHANGE",
    "RAY_EXIT_AFTER_ROUND",
    "STEP_DELAY_S",
    "install_from_env",
    "observe",
]


def install_from_env() -> None:
    """Observe the job's events for faults if any ``DILOCO_TEST_*`` variable is set."""
    if any(os.environ.get(name) for name in VARIABLES):
        events.install(observe)


def observe(name: str, **info: Any) -> None:
    """The fault observer: inject what the environment asks for at event ``name``."""
    if name == "after_backward":
        _after_backward(**info)
    elif name == "before_checkpoint_rename":
        _before_rename(**info)
    elif name == "ray_checkpoint_reported":
        _after_ray_checkpoint(**info)
    elif name == "exchange":
        _in_exchange(**info)


def _steps(name: str) -> set[int]:
    value = os.environ.get(name, "")
    return {int(s) for s in value.split(",") if s.strip()}


def _after_backward(step: int, dl: Any, rank: int, world: int) -> None:
    """Inject the NaN and kill faults of inner ``step`` (``dl``: the DiLoCo wrapper)."""
    if os.environ.get(STEP_DELAY_S):
        time.sleep(float(os.environ[STEP_DELAY_S]))
    if not (os.environ.get(NAN_AT_STEP) or os.environ.get(KILL_AT_STEP)):
        return
    if step in _steps(NAN_AT_STEP):
        with torch.no_grad():
            dl.fast_tensors()[0].fill_(float("nan"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    victim = int(os.environ.get(KILL_RANK, world - 1))
    if step in _steps(KILL_AT_STEP) and first_attempt and rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)


def _before_rename(step: int) -> None:
    """Simulate a crash between writing checkpoint ``step`` and renaming it into place."""
    if step in _steps(CRASH_BEFORE_RENAME):
        os._exit(1)


def _after_ray_checkpoint(round: int, rank: int, world: int, attempt: int) -> None:
    """Simulate a worker dying after the checkpoint of round ``round`` was reported to Ray."""
    victim = int(os.environ.get(KILL_RANK, world - 1))
    if round in _steps(RAY_EXIT_AFTER_ROUND) and attempt == 0 and rank == victim:
        os._exit(1)


def _in_exchange(group: int, round: int, shard: int) -> None:
    """Stop group ``group`` inside the exchange of ``round`` until it is killed (once)."""
    target = os.environ.get(PAUSE_IN_EXCHANGE, "")
    if target != f"{group}:{round}":
        return
    marker = Path(os.environ[MARKER_DIR]) / f"pause-g{group}-r{round}"
    if marker.exists():
        return
    if shard == 0:
        marker.touch()
    while True:
        time.sleep(1.0)
