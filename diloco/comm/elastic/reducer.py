"""The elastic reducer: each round's pseudo-gradient average over the groups that are there.

:class:`ElasticReducer` is the :class:`~diloco.algorithm.reducer.PseudoGradientReducer` of an
elastic run; the DiLoCo wrapper calls it once per round exactly as it calls the mesh reducer. One
call (:meth:`ElasticReducer.average`) is:

1. **quorum** — :meth:`Membership.quorum`: who takes part, and the cross-group process group;
2. **heal** — members behind the highest round receive θ, the outer state and the counters from a
   current member (:mod:`.heal`), then contribute zeros to this round's average;
3. **exchange** — the bucketed average of the current members' Δ (fp32 all-reduce, or the
   compressed two-phase exchange with error feedback), divided by how many contributed, plus one
   small all-reduce of statistics that also compares every member's θ checksum;
4. **redo** — if a member dies during 2–3 (a collective fails) every survivor restores its own Δ
   from a copy kept for the round, tears the process group down and goes back to 1: the round is
   not lost. The copy costs one fp32 buffer of this rank's shard (4·P/S bytes; on the host for a
   CUDA run) while the exchange runs.

Every rank of every member issues the same collectives in the same order; the shard ranks of one
group agree on success (:meth:`Membership.agree`) before anything is committed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from diloco.algorithm.reducer import PendingAverage
from diloco.comm.elastic.heal import HealState, heal
from diloco.comm.elastic.membership import Membership
from diloco.comm.elastic.quorum import Quorum
from diloco.comm.exchange import BucketExchange, Link
from diloco.errors import TopologyError, note
from diloco.job import events

__all__ = ["ElasticReducer"]


class _Done:
    def __init__(self, stats: dict):
        self.stats = stats

    def wait(self) -> dict:
        return self.stats


class ElasticReducer:
    """Averages Δ over the live worker groups of each round (module docstring).

    Args:
        membership: this rank's :class:`Membership` (started).
        groups: G, the configured number of groups (for the statistics).
        device: where the collectives' tensors live (CUDA with NCCL, else CPU).
        bucket_mb, compress, block: as for :class:`~diloco.comm.mesh.MeshReducer`.
    """

    def __init__(
        self,
        membership: Membership,
        groups: int,
        device: torch.device,
        bucket_mb: float = 25.0,
        compress: str = "none",
        block: int = 256,
    ):
        self.membership = membership
        self.groups = groups
        self.shards = membership.shards
        self.device = device
        self.exchange = BucketExchange(device, bucket_mb, compress, block)
        self.state: HealState | None = None

    def attach(self, state: HealState) -> None:
        """Give the reducer the job's shared state (needed to heal and to be healed)."""
        self.state = state

    # ------------------------------------------------------------------ the round
    def start_average(
        self, tensors: list[Tensor], ids: Sequence[int] | None = None
    ) -> PendingAverage:
        return _Done(self.average(tensors, ids))

    @torch.no_grad()
    def average(self, tensors: list[Tensor], ids: Sequence[int] | None = None) -> dict:
        """tensors ← mean of the current members' Δ (zeros in, the mean out, for a joiner)."""
        if self.state is None:
            raise RuntimeError("ElasticReducer.attach(state) must be called before the first round")
        ids = list(range(len(tensors))) if ids is None else list(ids)
        t0 = time.perf_counter()
        backup = [t.detach().to("cpu" if t.is_cuda else t.device, copy=True) for t in tensors]
        contributes = True
        redone = heal_bytes = 0
        healed: list[int] = []
        healed_at: float | None = None
        wait_s = 0.0
        while True:
            tq = time.perf_counter()
            q = self.membership.quorum(self.state.rounds(), self.state.trained())
            wait_s += time.perf_counter() - tq
            ok, stats = True, {}
            try:
                if q.behind:
                    sent, got, was_healed = self._heal(q)
                    heal_bytes += sent + got
                    healed = [q.members[i].group for i in q.behind]
                    if was_healed:
                        contributes = False  # this group's Δ came from a stale start point
                        healed_at = time.time()
                        self.exchange.forget_residuals()
                with self.membership.busy():
                    events.emit(
                        "exchange",
                        group=self.membership.group,
                        round=self.state.rounds() + 1,
                        shard=self.membership.shard,
                    )
                    stats, commit = self.exchange.run(
                        tensors, ids, self._link(q, contributes), self.state.checksum_tensors()
                    )
            except (RuntimeError, dist.DistError) as e:  # a member died mid-collective
                ok, failure = False, e
            if self.membership.agree(ok):
                commit()
                self.membership.lineage = q.epoch
                break
            redone += 1
            self.membership.exchange_failed()
            for t, b in zip(tensors, backup, strict=True):
                t.copy_(b)
            why = _short(failure) if not ok else "on another shard rank"
            note(
                f"group {self.membership.group}: the exchange of round {self.state.rounds() + 1} "
                f"failed ({why}); re-forming the quorum and redoing it from this group's Δ",
                self.membership.shard == 0,
            )
        mismatch = stats.pop("theta_mismatch", None)
        if mismatch is not None:
            raise TopologyError(
                f"slow weights differ between groups at round {self.state.rounds()}: group "
                f"{q.groups[mismatch]} disagrees with group {q.groups[0]}"
            )
        if healed_at is not None:
            stats.update(healed_self=True, healed_at=healed_at)
        stats.update(
            round=self.state.rounds() + 1,
            participants=len(q.current),
            participant_groups=[q.members[i].group for i in q.current],
            members=q.size,
            healed_groups=healed,
            heal_bytes=float(heal_bytes),
            exchanges_redone=redone,
            quorum_wait_s=wait_s,
            coordinator_kept=q.kept,
            elastic_s=time.perf_counter() - t0,
        )
        return stats

    def _link(self, q: Quorum, contributes: bool) -> Link:
        pg = self.membership.pg

        def world_sum(t: Tensor) -> None:
            self.membership.wait(dist.all_reduce(t, group=pg, async_op=True))
            if self.shards > 1:
                dist.all_reduce(t, group=self.membership.group_pg)

        return Link(
            pg=pg,
            size=q.size,
            rank=q.index,
            contributors=len(q.current),
            contributes=contributes and q.index in q.current,
            world_sum=world_sum,
            # Kept while the coordinator is away: a member that got a new quorum instead is not
            # coming; give up on it within a heartbeat timeout and ask the coordinator again.
            arrive_timeout_s=self.membership.settings.heartbeat_timeout_s if q.kept else None,
            wait=self.membership.wait,
        )

    def _heal(self, q: Quorum) -> tuple[int, int, bool]:
        """This round's healing (every member takes part); (bytes sent, received, was healed)."""
        pairs = [(q.donor_of(j), j) for j in q.behind]
        with self.membership.busy():
            sent, got, meta = heal(
                self.membership.pg, q.size, q.index, pairs, self.state, self._comm_device(),
                self.membership.wait,
            )  # fmt: skip
        if meta is not None:
            donor = next(d for d, j in pairs if j == q.index)
            self.membership.lineage = q.members[donor].lineage
        return sent, got, meta is not None

    def _comm_device(self) -> torch.device:
        return self.device if self.membership.backend == "nccl" else torch.device("cpu")

    def sum_over_shards(self, value: Tensor) -> Tensor:
        if self.shards == 1:
            return value
        t = value.detach().to(self._comm_device(), torch.float64, copy=True)
        dist.all_reduce(t, group=self.membership.group_pg)
        return t.to(value.device)


def _short(e: BaseException) -> str:
    """One line of an exception: its type and message, without gloo's source locations."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", " ".join(str(e).split()))
    return f"{type(e).__name__}: {text[:120]}"
