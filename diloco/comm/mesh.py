"""Averaging the pseudo-gradient over the (G, S) device mesh: :class:`MeshReducer`.

Implements :class:`diloco.algorithm.reducer.PseudoGradientReducer` (the seam between the loop
and the network) with ``torch.distributed`` collectives: a list of local tensors is averaged *in
place* across the G worker groups (never across the shards of one group: each shard rank averages
its own shard with the same shard of the other groups), and scalars are summed across the shards
of one group (for norms). The outer step is then computed identically by every group; there is
no parameter server. The bucketed arithmetic is :mod:`diloco.comm.exchange`'s, shared with the
elastic reducer.

``handle = reducer.start_average(tensors)`` issues the collectives and returns at once;
``handle.wait()`` finishes them, writes the average into ``tensors`` and returns the stats.
``reducer.average(tensors)`` is the blocking form, with at most two buckets in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from diloco.algorithm.reducer import Done, PendingAverage
from diloco.comm.compress import ErrorFeedback
from diloco.comm.exchange import BucketExchange, Link

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

    The statistics cost one extra all-reduce of 4G + 3 float64 scalars over the world: ‖Δ_g‖²
    and ⟨Δ_g, Δ̄⟩ of each rank's shard (computed while Δ_g is still in the caller's tensors and
    Δ̄ in the bucket), placed at the rank's group slot, plus ‖Δ̄‖²/G, Σ‖e‖²/G and a count of
    ranks whose Δ̄ is non-finite.

    :meth:`average` also reports ``reduce_wait_s``: how long a one-element all-reduce took
    before the buckets, i.e. the wait for the slowest group, apart from the transfer itself.
    Memory: at most two buckets' flat copies exist at once (each is written back as soon as its
    collective completes), so ``bucket_mb`` bounds the extra memory.

    Asynchronous use (:meth:`start_average`): every bucket's first collective is issued at once
    (``none``: its all-reduce; ``bf16``/``int8``: its ``all_to_all_single``) so that all of them
    travel during the inner steps they overlap with; ``wait()`` does the rest. Between
    ``start_average`` and ``wait`` the caller must not modify ``tensors`` (``wait`` reads Δ_g
    from them for the statistics, then writes Δ̄). Only one average may be in flight per set of
    ``ids`` (the residuals are updated in ``wait``).
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
        self.compress = compress
        self.block = block
        if mesh.device_type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device(mesh.device_type)
        self._device = device
        self._shard_pg = mesh.get_group("shard")
        self.exchange = BucketExchange(device, bucket_mb, compress if self.groups > 1 else "none",
                                       block)  # fmt: skip
        self.link = Link(
            pg=mesh.get_group("group"), size=self.groups, rank=self.group,
            contributors=self.groups, contributes=True, world_sum=_world_sum,
        )  # fmt: skip

    @property
    def error_feedback(self) -> ErrorFeedback | None:
        """The error-feedback residuals (None without compression or with one group)."""
        return self.exchange.error_feedback

    def buckets(self, tensors: list[Tensor]) -> list[list[int]]:
        """Indices of ``tensors`` per bucket: consecutive, at most ``bucket_mb`` of fp32 each."""
        return self.exchange.buckets(tensors)

    def residuals(self, like: list[Tensor], ids: Sequence[int] | None = None) -> list[Tensor]:
        """The error-feedback residuals of ``ids`` (created as zeros); [] without compression."""
        return self.exchange.residuals(like, ids)

    @torch.no_grad()
    def average(self, tensors: list[Tensor], ids: Sequence[int] | None = None) -> dict[str, Any]:
        """tensors ← mean_g tensors over the group sub-mesh, in place (see the class docstring)."""
        if self.groups == 1:
            return {}
        stats, commit = self.exchange.run(tensors, ids, self.link)
        commit()
        return stats

    @torch.no_grad()
    def start_average(
        self, tensors: list[Tensor], ids: Sequence[int] | None = None
    ) -> PendingAverage:
        """Issue the collectives of :meth:`average`; ``wait()`` on the result completes it."""
        if self.groups == 1:
            return Done()
        return self.exchange.start(tensors, ids, self.link, window=None)

    def sum_over_shards(self, value: Tensor) -> Tensor:
        """Sum of a scalar over this group's S shard ranks (an all-reduce when S > 1)."""
        if self.shards == 1:
            return value
        t = value.detach().to(self._device, torch.float64, copy=True)
        dist.all_reduce(t, group=self._shard_pg)
        return t.to(value.device)


def _world_sum(t: Tensor) -> None:
    """Sum over every rank of the job (the default process group)."""
    dist.all_reduce(t)
