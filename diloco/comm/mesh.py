"""Averaging the pseudo-gradient over the (G, S) device mesh: :class:`MeshReducer`.

Implements :class:`diloco.algorithm.reducer.PseudoGradientReducer` (the seam between the loop
and the network) with ``torch.distributed`` collectives: a list of local tensors is averaged *in
place* across the G worker groups (never across the shards of one group: each shard rank averages
its own shard with the same shard of the other groups), and scalars are summed across the shards
of one group (for norms). The outer step is then computed identically by every group; there is
no parameter server.

``handle = reducer.start_average(tensors)`` issues the collectives and returns at once;
``handle.wait()`` finishes them, writes the average into ``tensors`` and returns the stats.
``reducer.average(tensors)`` is ``start_average(tensors).wait()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from diloco.algorithm.reducer import Done, PendingAverage
from diloco.comm.compress import (
    Codec,
    ErrorFeedback,
    bytes_sent,
    exchange_average,
    exchange_decode,
    exchange_encode,
    make_codec,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["MeshReducer"]


class MeshReducer:
    """Average Δ over the ``"group"`` dim of a (G, S) ``DeviceMesh``; sums over ``"shard"``.

    Each rank holds its local shards Δ_g (``DTensor.to_local()``; plain tensors when S = 1).
    :meth:`average` packs them, in parameter order, into flat fp32 buckets of at most
    ``bucket_mb`` MiB (a tensor larger than that is a bucket of its own) and averages each bucket
    over the group sub-mesh, i.e. with the ranks of the same shard index in the other groups.
    Every rank issues the same collectives in the same order. With G = 1 nothing is sent at all
    (SNOO; ``compress`` then does nothing).

    ``compress`` (``outer.compress``) picks how a bucket is averaged:

    * ``"none"``: one ``all_reduce(AVG)`` in fp32 (exact mean).
    * ``"bf16"``, ``"int8"``: the two-phase exchange of :mod:`diloco.comm.compress`
      (``all_to_all_single`` of encoded chunks, fp32 average by the chunk's owner, re-encoded,
      ``all_gather_into_tensor``), with error feedback: the rank sends Δ_g + e_g and keeps the
      residual e_g (one fp32 tensor per parameter, in :attr:`error_feedback`, keyed by ``ids``).
      Every group applies the same decoded mean t; mean_g e_g is exactly what is still owed.
      ``block`` is the int8 block size. A round whose mean is non-finite anywhere (the wrapper
      skips it) leaves the residuals unchanged.

    Stats returned per round (all ranks get the same values; per-rank ones are this rank's):

    * ``bytes_sent``: bytes this rank sends for the pseudo-gradient, Σ_buckets of
      :func:`diloco.comm.compress.bytes_sent`: for ``none`` the fp32 ring all-reduce count
      2(G−1)/G · numel · 4, for ``bf16``/``int8`` exactly 2(G−1)·P per bucket (P: the payload
      of one chunk). The few scalars of the statistics are not counted.
    * ``buckets``: buckets averaged (collectives for Δ: one per bucket, two when compressed).
    * ``group_cosine``: mean over the G groups of cos(Δ_g, Δ̄), Δ̄ the mean every group applies
      (= mean_g Δ_g without compression; the decoded t with it), each over the whole model
      (inner products summed over the S shards).
    * ``pairwise_cosine`` (G = 2, no compression only): cos(Δ_1, Δ_2), derived exactly from the
      same scalars: ⟨Δ_1, Δ_2⟩ = 2‖Δ̄‖² − (‖Δ_1‖² + ‖Δ_2‖²)/2, which needs Δ̄ = mean_g Δ_g.
    * ``residual_norm`` (compression only): sqrt(mean_g ‖e_g‖²) of the new residuals of the
      averaged tensors, over the whole model (summed over the S shards).

    The statistics cost one extra all-reduce of 2G + 3 float64 scalars over the world: ‖Δ_g‖²
    and ⟨Δ_g, Δ̄⟩ of each rank's shard (computed while Δ_g is still in the caller's tensors and
    Δ̄ in the bucket), placed at the rank's group slot, plus ‖Δ̄‖²/G, Σ‖e‖²/G and a count of
    ranks whose Δ̄ is non-finite.

    Asynchronous use (:meth:`start_average`): ``none`` issues every bucket's all-reduce with
    ``async_op=True``; ``bf16``/``int8`` encode every bucket and issue its ``all_to_all_single``
    asynchronously, and ``wait()`` does the rest (each bucket's owner average needs its phase 1
    finished: it waits for it, issues the bucket's ``all_gather_into_tensor`` asynchronously, then
    waits for those and decodes). Between ``start_average`` and ``wait`` the caller must not
    modify ``tensors`` (``wait`` reads Δ_g from them for the statistics, then writes Δ̄).
    Only one average may be in flight per set of ``ids`` (the residuals are updated in ``wait``).
    """

    def __init__(
        self,
        mesh: DeviceMesh,
        bucket_mb: float = 25.0,
        compress: str = "none",
        block: int = 256,
    ):
        self.mesh = mesh
        self.groups = mesh["group"].size()
        self.shards = mesh["shard"].size()
        self.group = mesh.get_local_rank("group")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.compress = compress
        self.block = block
        self.codec: Codec | None = make_codec(compress, block)
        #: The error-feedback residuals (None without compression or with one group).
        self.error_feedback: ErrorFeedback | None = None
        if self.codec is not None and self.groups > 1:
            self.error_feedback = ErrorFeedback()
        self._group_pg = mesh.get_group("group")
        self._shard_pg = mesh.get_group("shard")
        if mesh.device_type == "cuda":
            self._device = torch.device("cuda", torch.cuda.current_device())
        else:
            self._device = torch.device(mesh.device_type)

    def buckets(self, tensors: list[Tensor]) -> list[list[int]]:
        """Indices of ``tensors`` per bucket: consecutive, at most ``bucket_mb`` of fp32 each."""
        out: list[list[int]] = []
        size = 0
        for i, t in enumerate(tensors):
            nbytes = t.numel() * 4
            if not out or (size + nbytes > self.bucket_bytes and size > 0):
                out.append([])
                size = 0
            out[-1].append(i)
            size += nbytes
        return out

    def residuals(self, like: list[Tensor], ids: Sequence[int] | None = None) -> list[Tensor]:
        """The error-feedback residuals of ``ids`` (created as zeros); [] without compression."""
        if self.error_feedback is None:
            return []
        ids = range(len(like)) if ids is None else ids
        return self.error_feedback.get(ids, like, self._device)

    @torch.no_grad()
    def average(self, tensors: list[Tensor], ids: Sequence[int] | None = None) -> dict[str, float]:
        """tensors ← mean_g tensors over the group sub-mesh, in place (see the class docstring)."""
        return self.start_average(tensors, ids).wait()

    @torch.no_grad()
    def start_average(
        self, tensors: list[Tensor], ids: Sequence[int] | None = None
    ) -> PendingAverage:
        """Issue the collectives of :meth:`average`; ``wait()`` on the result completes it."""
        if self.groups == 1:
            return Done()
        ids = list(range(len(tensors))) if ids is None else list(ids)
        if len(ids) != len(tensors):
            raise ValueError(f"{len(ids)} ids for {len(tensors)} tensors")
        pending = _Pending(self, tensors)
        residuals = self.residuals(tensors, ids)
        for idx in self.buckets(tensors):
            bucket = [tensors[i] for i in idx]
            numel = sum(t.numel() for t in bucket)
            if numel == 0:
                continue
            flat = torch.cat([t.reshape(-1).to(self._device, torch.float32) for t in bucket])
            pending.own_sq += torch.dot(flat, flat).double()
            b = _Bucket(idx, numel)
            if self.codec is None:
                b.work = dist.all_reduce(
                    flat, op=dist.ReduceOp.AVG, group=self._group_pg, async_op=True
                )
                b.flat = flat
            else:
                b.res = [residuals[i] for i in idx]
                flat += torch.cat([e.reshape(-1) for e in b.res])  # x = Δ + e
                send, b.error = exchange_encode(flat, self.groups, self.codec)
                del flat
                b.recv = torch.empty_like(send)
                b.work = dist.all_to_all_single(b.recv, send, group=self._group_pg, async_op=True)
                b.send = send  # kept alive until the collective completes
            pending.sent += bytes_sent(numel, self.groups, self.compress, self.block)
            pending.buckets.append(b)
        return pending

    def _finish(self, p: _Pending) -> dict[str, float]:
        G, codec = self.groups, self.codec
        if codec is not None:
            for b in p.buckets:  # phase 2: the owner's average, re-encoded and gathered
                b.work.wait()
                b.send = None
                c = codec.chunk(b.numel, G)
                payload, owner_error = exchange_average(b.recv, G, c, codec)
                lo = self.group * c
                hi = min(lo + c, b.numel)
                if hi > lo:  # e_j[chunk j] += G·(a_j − t_j)
                    b.error[lo:hi] += G * owner_error[: hi - lo]
                b.recv = torch.empty((G, payload.shape[1]), dtype=torch.uint8, device=self._device)
                b.work = dist.all_gather_into_tensor(
                    b.recv, payload, group=self._group_pg, async_op=True
                )
                b.send = payload
        own_dot = torch.zeros((), dtype=torch.float64, device=self._device)
        mean_sq = torch.zeros((), dtype=torch.float64, device=self._device)
        finite = torch.ones((), dtype=torch.bool, device=self._device)
        for b in p.buckets:
            b.work.wait()
            mean = b.flat if codec is None else exchange_decode(b.recv, b.numel, codec)
            mean_sq += torch.dot(mean, mean).double()
            finite &= torch.isfinite(mean).all()
            bucket = [p.tensors[i] for i in b.idx]
            for t, avg in zip(bucket, mean.split([t.numel() for t in bucket]), strict=True):
                own = t.reshape(-1).to(self._device, torch.float32)
                own_dot += torch.dot(own, avg).double()
                t.copy_(avg.view_as(t))
            b.flat = b.recv = b.send = None
        # One all-reduce over the world: per-group ‖Δ_g‖² and ⟨Δ_g, Δ̄⟩, ‖Δ̄‖², Σ‖e‖², non-finite.
        scalars = torch.zeros(2 * G + 3, dtype=torch.float64, device=self._device)
        scalars[self.group] = p.own_sq
        scalars[G + self.group] = own_dot
        scalars[2 * G] = mean_sq / G
        if codec is not None:
            for b in p.buckets:
                scalars[2 * G + 1] += torch.dot(b.error, b.error).double() / G
        scalars[2 * G + 2] = (~finite).double()
        dist.all_reduce(scalars)
        sq, dot, mean = scalars[:G], scalars[G : 2 * G], scalars[2 * G]
        cos = dot / (sq.sqrt() * mean.sqrt())
        stats = {
            "bytes_sent": p.sent,
            "buckets": float(len(p.buckets)),
            "group_cosine": float(cos.mean()),
        }
        if codec is None:
            if G == 2:
                cross = 2 * mean - sq.sum() / 2
                stats["pairwise_cosine"] = float(cross / (sq[0] * sq[1]).sqrt())
            return stats
        if float(scalars[2 * G + 2]) == 0:  # commit the new residuals (a skipped round: keep)
            for b in p.buckets:
                for e, new in zip(b.res, b.error.split([e.numel() for e in b.res]), strict=True):
                    e.copy_(new.view_as(e))
        stats["residual_norm"] = float(scalars[2 * G + 1].sqrt())
        return stats

    def sum_over_shards(self, value: Tensor) -> Tensor:
        """Sum of a scalar over this group's S shard ranks (an all-reduce when S > 1)."""
        if self.shards == 1:
            return value
        t = value.detach().to(self._device, torch.float64, copy=True)
        dist.all_reduce(t, group=self._shard_pg)
        return t.to(value.device)


@dataclass
class _Bucket:
    """One bucket in flight: its tensors' indices, numel, and the buffers of its collectives."""

    idx: list[int]
    numel: int
    work: Any = None
    flat: Tensor | None = None  # none: the bucket being all-reduced in place
    send: Tensor | None = None
    recv: Tensor | None = None
    error: Tensor | None = None  # compressed: the new residual, flat
    res: list[Tensor] = field(default_factory=list)  # compressed: the residual tensors


class _Pending:
    """:meth:`MeshReducer.start_average`'s handle."""

    def __init__(self, reducer: MeshReducer, tensors: list[Tensor]):
        self.reducer = reducer
        self.tensors = tensors
        self.buckets: list[_Bucket] = []
        self.own_sq = torch.zeros((), dtype=torch.float64, device=reducer._device)
        self.sent = 0.0
        self._done = False

    @torch.no_grad()
    def wait(self) -> dict[str, float]:
        if self._done:
            raise RuntimeError("wait() was already called on this average")
        self._done = True
        return self.reducer._finish(self)
