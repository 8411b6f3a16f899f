"""Liveness of elastic worker groups: the leader's heartbeats, and waiting on a collective
without waiting for a member that stopped.

* :class:`Heartbeat` — every group's leader (shard rank 0) beats the coordinator every
  ``heartbeat_timeout_s / 10`` from a background thread: to the lighthouse (membership: a group
  silent for ``heartbeat_timeout_s`` is dropped from the next quorum) and to a counter in the
  coordinator's store (below). It beats only while the training loop shows progress
  (:meth:`Heartbeat.progress` once per inner step) or is inside a long phase that is not a hang
  (:meth:`Heartbeat.busy`: the quorum, the exchange, healing, evaluation, a checkpoint); a loop
  with no progress for 3 heartbeat timeouts is a hang, and the group goes silent.
* :func:`wait_watching` — a stopped process (SIGSTOP, a hung host) never closes its sockets, so
  a collective it belongs to would wait for the process group's whole timeout. While waiting,
  the others watch its store counter (:class:`BeatWatch`, read at most every 0.5 s) and give up
  with an error once it has not moved for ``heartbeat_timeout_s``; the round is then redone
  without that member.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from diloco.comm.elastic.store import StoreClients

__all__ = ["BeatWatch", "Heartbeat", "beat_key", "wait_watching"]


def beat_key(replica_id: str) -> str:
    """The store key of a member's heartbeat counter."""
    return f"diloco/beat/{replica_id}"


class Heartbeat:
    """A group leader's heartbeats (module docstring); every rank tracks its own progress.

    ``url``: the lighthouse; ``store``: the coordinator's store; ``replica_id``: this group's
    id at the coordinator (None on a non-leader rank, which never beats).
    """

    def __init__(self, url: str, store: StoreClients, replica_id: str | None, timeout_s: float):
        self.url, self.store, self.replica_id, self.timeout_s = url, store, replica_id, timeout_s
        self._last_progress = time.monotonic()
        self._busy = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def progress(self) -> None:
        """The training loop is alive (call once per inner step)."""
        self._last_progress = time.monotonic()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """A long phase that is not a hang: beats continue while inside it."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self.progress()

    def alive(self) -> bool:
        stalled = time.monotonic() - self._last_progress
        return self._busy > 0 or stalled < 3 * self.timeout_s

    def start(self) -> None:
        """Beat from a background thread from now on (the leader only)."""
        self._thread = threading.Thread(target=self._run, name="diloco-heartbeat", daemon=True)
        self._thread.start()

    @property
    def interval(self) -> float:
        """Seconds between beats: a tenth of the heartbeat timeout."""
        return max(0.05, self.timeout_s / 10)

    def _run(self) -> None:
        clients: dict[str, Any] = {}
        while not self._stop.is_set():
            if self.alive():  # a hung loop stops beating: the others drop this group
                self.beat(clients)
            self._stop.wait(self.interval)

    def beat(self, clients: dict[str, Any] | None = None) -> None:
        """One beat to the store counter and to the lighthouse. ``clients`` keeps the
        lighthouse connection between beats; a failed beat drops it (the coordinator may be
        away) and the next one reconnects."""
        from torchft.coordination import LighthouseClient

        clients = {} if clients is None else clients
        with contextlib.suppress(Exception):  # first: a slow lighthouse call must not delay it
            self.store.call(lambda store: store.add(beat_key(self.replica_id), 1))
        try:
            if "lighthouse" not in clients:
                clients["lighthouse"] = LighthouseClient(
                    self.url, connect_timeout=timedelta(seconds=2)
                )
            clients["lighthouse"].heartbeat(self.replica_id, timeout=timedelta(seconds=2))
        except Exception:
            clients.pop("lighthouse", None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class BeatWatch:
    """The heartbeat counters of some members (replica id → group id), read from the store at
    most every 0.5 s; a member whose counter has not moved for ``timeout_s`` is silent. A
    member with no counter yet (a coordinator restarted with an empty store) is not judged."""

    def __init__(self, store: StoreClients, members: dict[str, int], timeout_s: float):
        self.store, self.members, self.timeout_s = store, members, timeout_s
        now = time.monotonic()
        self.seen: dict[str, tuple[bytes | None, float]] = {r: (None, now) for r in members}
        self.read_at = 0.0

    def silent(self, now: float) -> int | None:
        """The group id of a silent member, or None (also when the store cannot be read: the
        coordinator may be away, and then nobody is judged)."""
        if not self.members or now - self.read_at < 0.5:
            return None
        self.read_at = now
        keys = [beat_key(r) for r in self.members]
        try:
            values = self.store.call(lambda s: [s.get(k) if s.check([k]) else None for k in keys])
        except Exception:
            return None
        for replica_id, value in zip(self.members, values, strict=True):
            last, since = self.seen[replica_id]
            if value != last:
                self.seen[replica_id] = (value, now)
            elif value is not None and now - since > self.timeout_s:
                return self.members[replica_id]  # seen beating, then stopped
        return None


def wait_watching(work: Any, watch: BeatWatch, timeout_s: float | None = None) -> None:
    """Wait for a cross-group collective; raise RuntimeError when ``watch`` finds a member
    silent, or when ``timeout_s`` has passed. The work is polled (``is_completed``), first
    every 0.1 ms, backing off to every 10 ms: gloo's ``wait(timeout)`` is not safe to retry on
    point-to-point work, and NCCL's would block the stream."""
    start = time.monotonic()
    pause = 1e-4
    while not work.is_completed():
        time.sleep(pause)
        pause = min(0.01, pause * 2)
        now = time.monotonic()
        if timeout_s is not None and now - start > timeout_s:
            raise RuntimeError(f"a member did not arrive within {timeout_s:g} s")
        silent = watch.silent(now)
        if silent is not None:
            raise RuntimeError(
                f"group {silent} stopped heartbeating during the exchange (silent for more "
                f"than topology.heartbeat_timeout_s={watch.timeout_s:g} s)"
            )
    work.wait()  # raises if the collective failed (e.g. a member's connection closed)
