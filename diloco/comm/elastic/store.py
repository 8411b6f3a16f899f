"""Clients of the coordinator's rendezvous store, kept open for the process's life.

The store (a ``torch.distributed.TCPStore`` served by the coordinator) holds the heartbeat
counters, the run's settings, the start barrier and the finished mark. Its server stalls *every*
client for about 5 s when clients connect and disconnect in quick succession (measured on
torch 2.13: three clients adding to a counter every 50 ms saw a worst call of 0.4 ms alone and
4.98 s with two threads opening and dropping clients in a loop). A stall that long reads as a
silent member, so nothing here opens a client per call: each thread keeps one client and
reopens it only after a failed call (the coordinator restarted, or is away).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

__all__ = ["StoreClients"]

T = TypeVar("T")


class StoreClients:
    """One client of the store at ``host:port`` per calling thread (thread-local, lazy).

    ``timeout_s``: how long a call (and connecting) may take before it fails.
    """

    def __init__(self, host: str, port: int, timeout_s: float = 10.0):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._local = threading.local()

    def call(self, operation: Callable[[Any], T]) -> T:
        """``operation(client)`` on this thread's client; a failure drops the client (the next
        call reconnects) and is raised."""
        client = getattr(self._local, "client", None)
        try:
            if client is None:
                client = self._local.client = self._connect()
            return operation(client)
        except Exception:
            self._local.client = None
            raise

    def _connect(self) -> Any:
        from torch.distributed import TCPStore

        return TCPStore(
            self.host,
            self.port,
            is_master=False,
            wait_for_workers=False,
            timeout=timedelta(seconds=self.timeout_s),
        )
