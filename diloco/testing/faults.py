"""Test-only fault injection, switched on by environment variables. Never set them in real runs.

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
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

NAN_AT_STEP = "DILOCO_TEST_NAN_AT_STEP"
KILL_AT_STEP = "DILOCO_TEST_KILL_AT_STEP"
KILL_RANK = "DILOCO_TEST_KILL_RANK"
CRASH_BEFORE_RENAME = "DILOCO_TEST_CRASH_BEFORE_RENAME"
RAY_EXIT_AFTER_ROUND = "DILOCO_TEST_RAY_EXIT_AFTER_ROUND"

__all__ = [
    "after_backward",
    "after_ray_checkpoint",
    "before_rename",
    "NAN_AT_STEP",
    "KILL_AT_STEP",
    "CRASH_BEFORE_RENAME",
    "RAY_EXIT_AFTER_ROUND",
]


def _steps(name: str) -> set[int]:
    value = os.environ.get(name, "")
    return {int(s) for s in value.split(",") if s.strip()}


def after_backward(step: int, dl: Any, rank: int, world: int) -> None:
    """Inject the NaN and kill faults of inner ``step`` (``dl``: the DiLoCo wrapper)."""
    if not (os.environ.get(NAN_AT_STEP) or os.environ.get(KILL_AT_STEP)):
        return
    if step in _steps(NAN_AT_STEP):
        with torch.no_grad():
            dl.fast_tensors()[0].fill_(float("nan"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    victim = int(os.environ.get(KILL_RANK, world - 1))
    if step in _steps(KILL_AT_STEP) and first_attempt and rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)


def before_rename(step: int) -> None:
    """Simulate a crash between writing checkpoint ``step`` and renaming it into place."""
    if step in _steps(CRASH_BEFORE_RENAME):
        os._exit(1)


def after_ray_checkpoint(round_: int, rank: int, world: int, attempt: int) -> None:
    """Simulate a worker dying after the checkpoint of round ``round_`` was reported to Ray."""
    victim = int(os.environ.get(KILL_RANK, world - 1))
    if round_ in _steps(RAY_EXIT_AFTER_ROUND) and attempt == 0 and rank == victim:
        os._exit(1)
