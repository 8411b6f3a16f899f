"""Shared helpers for the multi-process tests: run ``diloco`` under torchrun or as a CLI process.

(``tests/`` has no ``__init__.py``; pytest puts this directory on ``sys.path``, so test modules
``from helpers import …``.)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from diloco.job.metrics import read_metrics
from diloco.launchers.local import child_env, torchrun_cmd


def sets(overrides: Sequence[str]) -> list[str]:
    """``--set a --set b …`` for a list of ``section.key=value`` overrides."""
    return [arg for o in overrides for arg in ("--set", o)]


def tiny_overrides(steps: int, k: int, *extra: str) -> list[str]:
    """The multi-process tests' job: a 2-layer, width-32 GPT (block 32, batch 8) on the CPU over
    gloo in fp32, ``steps`` steps with K = ``k``, 4 warm-up steps, 2 eval batches, no progress
    bar; ``extra`` settings are appended (a later setting of the same key wins)."""
    return [
        "model.n_layer=2",
        "model.n_embd=32",
        "model.block_size=32",
        "data.batch_size=8",
        f"train.steps={steps}",
        f"outer.sync_every={k}",
        "inner.warmup_steps=4",
        "train.eval_batches=2",
        "run.device=cpu",
        "run.progress=false",
        "topology.backend=gloo",
        "topology.mixed_precision=fp32",
        *extra,
    ]


def run_torchrun(
    nproc: int,
    overrides: Sequence[str],
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 240,
    restarts: int | None = None,
) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m diloco train --set … ARGS…`` (see torchrun_cmd)."""
    cmd = torchrun_cmd(nproc, "-m", "diloco", "train", *sets(overrides), *args, restarts=restarts)
    return subprocess.run(cmd, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def run_torchrun_script(
    nproc: int, script: Path, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc SCRIPT ARGS…`` (a test's own worker program)."""
    cmd = torchrun_cmd(nproc, str(script), *args)
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """``python -m diloco ARGS…`` in a fresh process."""
    cmd = [sys.executable, "-m", "diloco", *args]
    return subprocess.run(cmd, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def same_fields(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl without its timings (keys ending in ``_s``)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_metrics(path)]


def logging_run(out_dir, *extra: str) -> list[str]:
    """The loggers' tests' job: a 1-layer, width-32 GPT, 10 steps with K = 5 and an evaluation
    every 5 steps, into ``out_dir``; ``extra`` settings are appended."""
    return [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=32",
        "data.batch_size=4",
        "train.steps=10",
        "train.eval_every=5",
        "train.eval_batches=1",
        "inner.warmup_steps=2",
        "outer.sync_every=5",
        "run.progress=false",
        f"run.out_dir={out_dir}",
        *extra,
    ]
