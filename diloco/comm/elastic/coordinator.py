"""The coordinator of elastic worker groups: torchft's lighthouse (membership) + a rendezvous store.

One process for the whole job (``diloco coordinator --bind HOST:PORT``), reached by every group's
leader rank. It holds no tensors and no training state:

* **Membership** — torchft's Rust ``LighthouseServer`` on ``HOST:PORT``: group leaders heartbeat
  it and ask it for a quorum at every round boundary. It forms one quorum at a time from the
  groups whose heartbeats are fresh (``heartbeat_timeout_s``), at least ``min_groups`` of them and
  more than half of the live ones (its split-brain guard), waits up to ``join_timeout_s`` for a live
  group that has not asked yet, and numbers quorums: the id changes when the members change.
* **Rendezvous** — a ``torch.distributed.TCPStore`` on ``HOST:PORT+1``. Each quorum's cross-group
  process groups meet under their own key prefix (one per quorum id and shard index), and the job
  keeps three small keys here: the coordinator's settings, the start count and the finished round.

If the coordinator stops, groups keep training with the membership they have (see
:mod:`diloco.comm.elastic.membership`); a restarted coordinator on the same address is found again.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import asdict, dataclass
from datetime import timedelta

from diloco.errors import TopologyError

__all__ = [
    "CoordinatorSettings",
    "Coordinator",
    "parse_address",
    "require_torchft",
    "run_coordinator",
    "store_port",
]

#: Keys the coordinator's store holds besides the process groups' rendezvous prefixes.
SETTINGS_KEY = "diloco/settings"
STARTED_KEY = "diloco/started"
FINISHED_KEY = "diloco/finished"


@dataclass(frozen=True)
class CoordinatorSettings:
    """What the coordinator enforces; every group checks it runs with the same values."""

    groups: int
    min_groups: int
    heartbeat_timeout_s: float
    join_timeout_s: float

    @classmethod
    def from_topology(cls, topology) -> CoordinatorSettings:
        return cls(
            groups=topology.groups,
            min_groups=topology.min_groups,
            heartbeat_timeout_s=topology.heartbeat_timeout_s,
            join_timeout_s=topology.join_timeout_s,
        )


def require_torchft() -> None:
    """Raise TopologyError (one line) unless torchft, which elastic groups are built on, imports."""
    try:
        import torchft.coordination  # noqa: F401
    except ImportError as e:
        raise TopologyError(
            f"elastic worker groups need torchft ({e}); install it with "
            "pip install -e '.[elastic]' (or pip install 'torchft>=0.2,<0.3')"
        ) from None


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); raises TopologyError if malformed."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise TopologyError(
            f"coordinator address {address!r} is not HOST:PORT with a port in 1..65534 "
            "(e.g. topology.coordinator=10.0.0.1:29510)"
        )
    return host, int(port)


def store_port(port: int) -> int:
    """The rendezvous store listens on the port after the lighthouse's."""
    return port + 1


class Coordinator:
    """The lighthouse and the rendezvous store of one job, in this process (background threads).

    ``port=0`` picks a free lighthouse port (the store takes the next one; used by tests).
    """

    def __init__(self, host: str, port: int, settings: CoordinatorSettings):
        require_torchft()
        from torch.distributed import TCPStore
        from torchft.coordination import LighthouseServer

        self.settings = settings
        ms = lambda s: max(1, int(s * 1000))  # noqa: E731
        try:
            self._lighthouse = LighthouseServer(
                bind=f"{host}:{port}",
                min_replicas=settings.min_groups,
                join_timeout_ms=ms(settings.join_timeout_s),
                quorum_tick_ms=10,
                heartbeat_timeout_ms=ms(settings.heartbeat_timeout_s),
            )
        except Exception as e:  # the Rust side reports a busy port as a generic error
            raise TopologyError(f"cannot start the coordinator on {host}:{port}: {e}") from None
        self.host = host
        self.port = int(self._lighthouse.address().rsplit(":", 1)[1])
        try:
            self._store = TCPStore(
                host,
                store_port(self.port),
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=30),
            )
        except Exception as e:
            self._lighthouse.shutdown()
            raise TopologyError(
                f"cannot start the coordinator's rendezvous store on {host}:"
                f"{store_port(self.port)} (the port after --bind's): {e}"
            ) from None
        self._store.set(SETTINGS_KEY, json.dumps(asdict(settings)))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def shutdown(self) -> None:
        self._lighthouse.shutdown()
        del self._store


def run_coordinator(bind: str, settings: CoordinatorSettings, ready_file: str | None = None) -> int:
    """``diloco coordinator``: serve until SIGINT/SIGTERM; prints one line with the address."""
    os.environ.setdefault("RUST_LOG", "warn")
    host, port = parse_address(bind) if bind != "auto" else ("127.0.0.1", 0)
    coordinator = Coordinator(host, port, settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"diloco: coordinator on {coordinator.address} (rendezvous store on port "
        f"{store_port(coordinator.port)}): {settings.groups} groups, at least "
        f"{settings.min_groups} per round, heartbeat timeout {settings.heartbeat_timeout_s:g} s",
        flush=True,
    )
    if ready_file:
        with open(ready_file + ".tmp", "w") as f:
            f.write(coordinator.address)
        os.replace(ready_file + ".tmp", ready_file)
    while not stop.wait(0.5):
        pass
    coordinator.shutdown()
    return 0
