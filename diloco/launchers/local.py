"""Starting ``diloco`` processes on this machine (``diloco launch local``, benchmarks, tests).

One place for what every local launch needs: a free loopback port for the rendezvous, the
child environment (one torch thread per process, so that the processes do not fight over the
cores, docs/troubleshooting.md; a private rendezvous store per job; this checkout importable
without installing it) and the ``torchrun`` command.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from diloco.errors import DilocoError

__all__ = ["REPO", "child_env", "free_port", "free_port_pair", "torchrun_cmd"]

#: The checkout this package lives in (put on the children's PYTHONPATH).
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A TCP port p on ``host`` with p + 1 free too (an elastic coordinator's lighthouse and
    rendezvous store)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind((host, 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind((host, port + 1))
            except OSError:
                continue
            return port
    raise DilocoError(f"no free pair of ports on {host} for the coordinator")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``OMP_NUM_THREADS=1``,
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` and the checkout on ``PYTHONPATH``; ``extra``
    wins over all of them."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p),
        **(extra or {}),
    }


def torchrun_cmd(nproc: int, *target: str, restarts: int | None = None) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node nproc TARGET…`` on loopback: a static
    free port, or with ``restarts`` the standalone c10d rendezvous (on gloo, restarts only work
    with it, docs/troubleshooting.md). ``target``: ``-m diloco train …`` or a script and its
    arguments."""
    if restarts is None:
        rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    else:
        rendezvous = ["--standalone", "--max-restarts", str(restarts)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        *rendezvous, *target,
    ]  # fmt: skip
