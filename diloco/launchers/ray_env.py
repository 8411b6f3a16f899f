"""The driver's Ray environment: importing Ray, the variables it reads at import, its temp
directory, the local GPUs, and a reachability check of a cluster address."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

from diloco.launchers.ray_plan import RayLaunchError

__all__ = ["RAY_MISSING", "QUIET_LINES", "check_reachable", "import_ray", "local_gpus", "ray_env",
           "ray_tmpdir"]  # fmt: skip

RAY_MISSING = "Ray is not installed; install it with: pip install -e '.[ray]'"


def import_ray():
    try:
        import ray
        import ray.train  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise RayLaunchError(RAY_MISSING) from None
    return ray


#: Forwarded worker log lines the driver skips (``RAY_DEDUP_LOGS_SKIP_REGEX``; set it, or
#: ``RAY_DEDUP_LOGS=0``, to see everything): Ray Train's two INFO lines per report and worker,
#: and, without a dashboard (``ray[train]`` has none), its placement-group cleaner's warning
#: every second that the State API is missing.
QUIET_LINES = (
    r"Reporting training result \d+: |Checkpoint successfully created at: |"
    r"Failed to query Ray Train Controller actor state"
)


def ray_env(local: bool) -> None:
    """Environment Ray reads when it is imported (set on the imported modules if it already was).

    Always: skip :data:`QUIET_LINES` in forwarded logs. Local mode: advertise 127.0.0.1 (so
    MASTER_ADDR is loopback), send no usage statistics, and start no preemption watcher (one
    process less; a private one-machine cluster has no node to preempt).
    """
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", QUIET_LINES)
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        if local:
            constants.ENABLE_RAY_CLUSTER = False
        logs = sys.modules.get("ray._private.ray_logging")
        for dedup in (
            getattr(logs, "stdout_deduplicator", None),
            getattr(logs, "stderr_deduplicator", None),
        ):
            if dedup is not None and getattr(dedup, "skip_re", None) is None:
                dedup.skip_re = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])


def ray_tmpdir() -> str:
    path = os.environ.get("RAY_TMPDIR") or f"/tmp/ray-{os.getuid()}"
    os.environ["RAY_TMPDIR"] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install: the job then runs on CPUs
        return 0


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds, in one line, where ``ray.init`` would retry an address forever."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayLaunchError(
            f"--address {address!r} is not local, auto, host:port or ray://host:port"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayLaunchError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it with "
            "'ray start --head' or fix --address / RAY_ADDRESS"
        ) from None
