"""Shared helpers for the multi-process tests: run ``diloco`` under torchrun or as a CLI process.

(``tests/`` has no ``__init__.py``; pytest puts this directory on ``sys.path``, so test modules
``from helpers import …``.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from diloco.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """One thread per process (NOTES.md), private torchrun stores, this checkout importable."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(extra or {}),
    }


def sets(overrides: Sequence[str]) -> list[str]:
    """``--set a --set b …`` for a list of ``section.key=value`` overrides."""
    return [arg for o in overrides for arg in ("--set", o)]


def run_torchrun(
    nproc: int,
    overrides: Sequence[str],
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m diloco train --set …`` on loopback."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "diloco", "train", *sets(overrides), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """``python -m diloco ARGS…`` in a fresh process."""
    cmd = [sys.executable, "-m", "diloco", *args]
    return subprocess.run(cmd, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def same_fields(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl without its timings (keys ending in ``_s``)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_metrics(path)]
