"""Elastic membership: which worker groups take part in a round, and the process group joining them.

Each worker group is its own ``torch.distributed`` world of S shard ranks (FSDP2 inside it). The
groups meet only at round boundaries, through the coordinator (:mod:`.coordinator`):

* the group's **leader** (shard rank 0) heartbeats the coordinator from a background thread, as
  long as its training loop shows progress (:meth:`Membership.progress`, or inside
  :meth:`Membership.busy`); a stopped process or a hung loop stops beating and is dropped after
  ``topology.heartbeat_timeout_s``;
* at every round boundary the leader asks for a **quorum** (:meth:`Membership.quorum`, a collective
  of the group's S ranks: the leader shares the answer over the group's own process group). Each
  member states its group id, its round (outer steps done) and whether it holds trained weights;
* every shard rank s then joins the **cross-group process group** of its shard index: the rank-s
  processes of all members, ranked by group id, built by torchft's reconfigurable
  ``ProcessGroupGloo``/``ProcessGroupNCCL`` on a fresh key prefix of the coordinator's store (one
  per membership epoch: quorum id + failed-exchange count). It is rebuilt only when the epoch
  changes, so a round with the same members costs one quorum round-trip (~1 ms on loopback).

Roles in a quorum (:class:`Quorum`): members at the highest round are *current*; members behind it
(restarted, or woken from a stall) *heal* from a current member before the exchange. A member that
has never trained (round 0) is current only when every member is at round 0, so a fresh group can
never overwrite trained ones.

When the coordinator cannot be reached (connection refused or timed out), a group that has a
membership whose members were all current keeps it: the round's exchange runs on the existing
process group. If that fails too (a member died while the coordinator is away), the group retries
the coordinator until ``topology.quorum_timeout_s`` and then stops with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from diloco.comm.elastic.coordinator import (
    FINISHED_KEY,
    SETTINGS_KEY,
    STARTED_KEY,
    CoordinatorSettings,
    parse_address,
    store_port,
)
from diloco.comm.elastic.liveness import BeatWatch, Heartbeat, wait_watching
from diloco.comm.elastic.quorum import Member, Quorum, RunFinished, admit
from diloco.comm.elastic.store import StoreClients
from diloco.errors import TopologyError, note

__all__ = ["Membership"]


@dataclass
class _Leader:
    """What only the group leader holds: its replica id and its coordinator client."""

    replica_id: str
    quorum_client: Any = None


class Membership:
    """This rank's view of the elastic job (one per process; see the module docstring).

    Args:
        coordinator: ``HOST:PORT`` of the coordinator.
        settings: the job's coordinator settings (G, min_groups, timeouts), checked against the
            coordinator's own.
        group: this worker group's id (0 .. G−1).
        shard, shards: this rank's index in its group, and S.
        group_pg: the group's own process group (the default one when S > 1; None when S = 1).
        backend: ``gloo`` or ``nccl`` for the cross-group process groups.
        timeout_s: their timeout (rendezvous and each collective).
        quorum_timeout_s: how long a round boundary may wait for a quorum (or the coordinator).
        fingerprint: the group's config fingerprint; a group whose fingerprint differs from
            the others' is refused (with one line) instead of training on other settings.
    """

    def __init__(
        self,
        coordinator: str,
        settings: CoordinatorSettings,
        group: int,
        shard: int,
        shards: int,
        group_pg: dist.ProcessGroup | None,
        backend: str,
        timeout_s: float,
        quorum_timeout_s: float,
        fingerprint: str = "",
    ):
        self.host, self.port = parse_address(coordinator)
        self.fingerprint = fingerprint
        self.address = coordinator
        self.settings = settings
        self.group, self.shard, self.shards = group, shard, shards
        self.group_pg = group_pg
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.quorum_timeout_s = quorum_timeout_s
        self.started = time.time()
        self.failures = 0  # failed exchanges so far: part of the next epoch's key
        #: Where this group's θ comes from: "start" (initialised from the seed), "restored-r<R>"
        #: (a checkpoint of round R), else the epoch of the exchange that made it (a healed
        #: group takes its donor's). Members at one round with different lineages vote.
        self.lineage = "start"
        self.last_quorum: Quorum | None = None  # the membership the process group was built for
        self._pg = None  # torchft's reconfigurable process group (built lazily)
        self._epoch: str | None = None
        self._said_kept = False
        self._leader: _Leader | None = None
        if shard == 0:
            self._leader = _Leader(replica_id=f"g{group:05d}:{uuid.uuid4().hex[:12]}")
        replica_id = self._leader.replica_id if self._leader is not None else None
        #: The coordinator's store: one client per thread, kept (see :mod:`.store`).
        self.store = StoreClients(self.host, store_port(self.port))
        self.heartbeat = Heartbeat(self._url(), self.store, replica_id,
                                   settings.heartbeat_timeout_s)  # fmt: skip

    # ------------------------------------------------------------------ liveness
    def progress(self) -> None:
        """The training loop is alive (call once per inner step)."""
        self.heartbeat.progress()

    def busy(self) -> contextlib.AbstractContextManager:
        """A long phase that is not a hang (quorum, exchange, healing, evaluation, checkpoint)."""
        return self.heartbeat.busy()

    def _url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ start
    def start(self, round: int, trained: bool) -> None:
        """Join the job (a collective of the group): check the coordinator's settings, wait for
        the other groups at a fresh start, and start heartbeating."""
        if trained:
            self.lineage = f"restored-r{round}"
        error = None
        if self._leader is not None:
            try:
                self._check_settings()
                # Beat once before the start barrier: when every group has passed it, every
                # group is known alive, so the first quorum waits for all of them.
                self.heartbeat.beat()
                if round == 0 and not trained:
                    self._start_barrier()
            except TopologyError as e:
                error = str(e)
            else:
                self.heartbeat.start()
        error = self._share(error)
        if error:
            raise TopologyError(error)

    def _check_settings(self) -> None:
        deadline = time.monotonic() + self.quorum_timeout_s
        while True:
            try:
                theirs = json.loads(self.store.call(lambda s: s.get(SETTINGS_KEY)))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise TopologyError(
                        f"no coordinator answers at topology.coordinator={self.address} after "
                        f"topology.quorum_timeout_s={self.quorum_timeout_s:g} s; start it with "
                        f"'diloco coordinator --bind {self.address} --config ...' (or use "
                        "'diloco launch local --elastic')"
                    ) from None
                time.sleep(0.5)
        mine = self.settings.__dict__
        diff = [
            f"{k}={theirs.get(k)} (this group: {v})" for k, v in mine.items() if theirs.get(k) != v
        ]
        if diff:
            raise TopologyError(
                f"the coordinator at {self.address} runs with {', '.join(diff)}; start it with "
                "the same config as the groups"
            )

    def _start_barrier(self) -> None:
        """A fresh run starts its first round with every group (or after join_timeout_s)."""

        def started(increment: int) -> int:
            return int(self.store.call(lambda s: s.add(STARTED_KEY, increment)))

        started(1)
        deadline = time.monotonic() + self.settings.join_timeout_s
        while started(0) < self.settings.groups:
            if time.monotonic() > deadline:
                n = started(0)
                note(
                    f"starting with {n} of {self.settings.groups} groups after "
                    f"topology.join_timeout_s={self.settings.join_timeout_s:g} s"
                )
                return
            time.sleep(0.05)

    # ------------------------------------------------------------------ quorum
    def quorum(self, round: int, trained: bool) -> Quorum:
        """This round's members (a collective of the group's S ranks); builds the cross-group
        process group when the membership epoch changed.

        Raises:
            TopologyError: no quorum of ``min_groups`` within ``quorum_timeout_s`` (or a second
                process claims this group id, or the coordinator stays unreachable).
            RunFinished: the job's last round was done while this group was away.
        """
        with self.busy():
            answer = self._ask(round, trained) if self._leader is not None else None
            answer = self._share(answer)
            if answer.startswith("error:"):
                raise TopologyError(answer[len("error:") :])
            q = Quorum.from_json(answer)
            if q.finished_round is not None and q.max_round < q.finished_round:
                raise RunFinished(
                    f"the run finished at round {q.finished_round} while group {self.group} "
                    f"was at round {round}; nothing left to do"
                )
            if q.epoch != self._epoch:
                self._configure(q)
            self.last_quorum = q
            return q

    def _share(self, text: str | None) -> str | None:
        """The leader's ``text`` on every rank of the group (a no-op when S = 1)."""
        if self.shards == 1:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0, group=self.group_pg)
        return box[0]

    def _ask(self, round: int, trained: bool) -> str:
        """Leader: one quorum from the coordinator (or the kept membership), as JSON."""
        from torchft.coordination import LighthouseClient

        leader = self._leader
        t0 = time.monotonic()
        deadline = t0 + self.quorum_timeout_s
        data = {
            "group": self.group,
            "round": round,
            "trained": trained,
            "started": self.started,
            "fingerprint": self.fingerprint,
            "failures": self.failures,
            "lineage": self.lineage,
        }
        while True:
            try:
                if leader.quorum_client is None:
                    leader.quorum_client = LighthouseClient(
                        self._url(), connect_timeout=timedelta(seconds=5)
                    )
                if self._said_kept:  # the coordinator was away: is it back?
                    leader.quorum_client.heartbeat(leader.replica_id, timeout=timedelta(seconds=2))
                    # A restarted coordinator knows only the groups whose heartbeats reached it,
                    # and would form the first quorum without the others: let every live group's
                    # heartbeat thread reach it first.
                    time.sleep(3 * self.heartbeat.interval)
                left = max(1.0, deadline - time.monotonic())
                raw = leader.quorum_client.quorum(
                    replica_id=leader.replica_id,
                    timeout=timedelta(seconds=left),
                    address=self.address,
                    store_address=self.address,
                    step=round,
                    world_size=self.shards,
                    shrink_only=False,
                    data=data,
                )
            except TimeoutError:
                return "error:" + self._no_quorum_message()
            except Exception as e:  # the coordinator is unreachable
                leader.quorum_client = None
                kept = self._kept(round, time.monotonic() - t0)
                if kept is not None:
                    return kept
                if time.monotonic() > deadline:
                    return (
                        f"error:the coordinator at {self.address} was unreachable for "
                        f"topology.quorum_timeout_s={self.quorum_timeout_s:g} s and the "
                        f"membership changed ({type(e).__name__}); restart it at the same address"
                    )
                time.sleep(1.0)
                continue
            self._said_kept = False
            view = self._view(raw, round, time.monotonic() - t0)
            return view if isinstance(view, str) else view.to_json()

    def _no_quorum_message(self) -> str:
        return (
            f"no quorum of topology.min_groups={self.settings.min_groups} groups within "
            f"topology.quorum_timeout_s={self.quorum_timeout_s:g} s (coordinator "
            f"{self.address}); start the missing groups, or lower topology.min_groups"
        )

    def _kept(self, round: int, waited_s: float) -> str | None:
        """The current membership, kept while the coordinator is away (if all were current)."""
        q = self.last_quorum
        if q is None or q.behind or self._epoch != q.epoch:
            return None  # nothing to keep, or its process group already failed
        if not self._said_kept:
            note(
                f"group {self.group}: coordinator {self.address} unreachable; keeping the "
                f"membership of groups {q.groups} until it is back"
            )
            self._said_kept = True
        members = tuple(
            dataclasses.replace(m, round=round, trained=m.trained or round > 0) for m in q.members
        )
        return Quorum(
            q.quorum_id, q.epoch, members, q.index, kept=True, waited_s=waited_s
        ).to_json()

    def _view(self, raw: Any, round: int, waited_s: float) -> Quorum | str:
        """The lighthouse's quorum as this job sees it: members ranked by group id, minus the
        rejected ones (every member computes the same list); an ``error:`` line if this group
        is rejected."""
        members = []
        for p in raw.participants:
            d = _data(p)
            members.append(
                Member(
                    group=int(d["group"]),
                    round=int(d["round"]),
                    trained=bool(d["trained"]),
                    replica_id=p.replica_id,
                    started=float(d["started"]),
                    fingerprint=str(d.get("fingerprint", "")),
                    lineage=str(d.get("lineage", "start")),
                )
            )
        members, rejected = admit(members)
        mine = rejected.get(self._leader.replica_id)
        if mine is not None:
            return "error:" + mine
        index = next(i for i, m in enumerate(members) if m.replica_id == self._leader.replica_id)
        # Any member's failed exchange changes the sum, so every member rebuilds its process group.
        failures = sum(int(_data(p)["failures"]) for p in raw.participants)
        epoch = self._epoch_key(raw.quorum_id, failures, members)
        return Quorum(
            raw.quorum_id,
            epoch,
            tuple(members),
            index,
            waited_s=waited_s,
            finished_round=self._finished_round(),
        )

    @staticmethod
    def _epoch_key(quorum_id: int, failures: int, members) -> str:
        ids = ",".join(m.replica_id for m in members)
        return f"q{quorum_id}.f{failures}.{uuid.uuid5(uuid.NAMESPACE_OID, ids).hex[:8]}"

    def _finished_round(self) -> int | None:
        with contextlib.suppress(Exception):
            value = self.store.call(
                lambda s: s.get(FINISHED_KEY) if s.check([FINISHED_KEY]) else None
            )
            if value:
                return int(value)
        return None

    # ------------------------------------------------------------------ process group
    def _configure(self, q: Quorum) -> None:
        """Join the cross-group process group of this shard index for epoch ``q.epoch``."""
        if self._pg is None:
            from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

            cls = ProcessGroupNCCL if self.backend == "nccl" else ProcessGroupGloo
            self._pg = cls(timeout=self.timeout)
        host = f"[{self.host}]" if ":" in self.host else self.host
        prefix = f"{host}:{store_port(self.port)}/diloco/pg/{q.epoch}/s{self.shard}"
        self._pg.configure(prefix, f"g{self.group}s{self.shard}", q.index, q.size)
        self._epoch = q.epoch

    @property
    def pg(self) -> dist.ProcessGroup:
        """The cross-group process group of the current quorum (this shard index)."""
        return self._pg.parent

    def exchange_failed(self) -> None:
        """An exchange on the current process group failed: tear it down; the next quorum
        builds a new one (a new epoch, even if the members are the same)."""
        self.failures += 1
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.abort(errored=False)
        self._epoch = None

    def wait(self, work: Any, timeout_s: float | None = None) -> None:
        """Wait for a collective on the cross-group process group, giving up on a member that
        stops heartbeating meanwhile (:func:`~.liveness.wait_watching`)."""
        q = self.last_quorum
        others = {m.replica_id: m.group for i, m in enumerate(q.members) if i != q.index}
        watch = BeatWatch(self.store, others, self.settings.heartbeat_timeout_s)
        wait_watching(work, watch, timeout_s)

    def agree(self, ok: bool) -> bool:
        """Did every shard rank of this group succeed (a MIN over the group's own ranks)?"""
        if self.shards == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group_pg)
        return bool(flag.item())

    # ------------------------------------------------------------------ end
    def finish(self, round: int) -> None:
        """Record that the job's last round (``round``) is done, so late joiners stop."""
        if self._leader is None:
            return
        with contextlib.suppress(Exception):
            self.store.call(lambda s: s.set(FINISHED_KEY, str(round)))

    def close(self) -> None:
        self.heartbeat.stop()
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.abort(errored=False)
            self._pg = None


def _data(participant: Any) -> dict:
    """A quorum member's ``data`` (torchft hands it back as a dict, or as JSON text)."""
    d = participant.data
    return d if isinstance(d, dict) else json.loads(d)
