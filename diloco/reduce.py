"""Averaging the pseudo-gradient across worker groups: the seam between the loop and the network.

A reducer averages a list of local tensors *in place* across the G worker groups (never across
the shards of one group: each shard rank averages its own shard with the same shard of the other
groups) and sums scalars across the shards of one group (for norms). The outer step is then
computed identically by every group; there is no parameter server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["PseudoGradientReducer", "SingleGroup", "MeshReducer", "ring_allreduce_bytes"]


class PseudoGradientReducer(Protocol):
    """How the pseudo-gradient Δ_g of each group becomes mean_g Δ_g."""

    groups: int

    def average(self, tensors: list[Tensor]) -> dict[str, float]:
        """tensors ← mean over groups, in place; returns per-round stats (bytes sent, cosine)."""
        ...

    def sum_over_shards(self, value: Tensor) -> Tensor:
        """Sum of a scalar over the shard ranks of this group."""
        ...


class SingleGroup:
    """One group of one rank (SNOO, or no process group): nothing to send."""

    groups = 1

    def average(self, tensors: list[Tensor]) -> dict[str, float]:
        return {}

    def sum_over_shards(self, value: Tensor) -> Tensor:
        return value


def ring_allreduce_bytes(numel: int, ranks: int, element_size: int = 4) -> float:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements: 2(n−1)/n · numel · size."""
    return 2 * (ranks - 1) / ranks * numel * element_size if ranks > 1 else 0.0


class MeshReducer:
    """Average Δ over the ``"group"`` dim of a (G, S) ``DeviceMesh``; sums over ``"shard"``.

    Each rank holds its local shards Δ_g (``DTensor.to_local()``; plain tensors when S = 1).
    :meth:`average` packs them, in parameter order, into flat fp32 buckets of at most
    ``bucket_mb`` MiB (a tensor larger than that is a bucket of its own) and runs one
    ``all_reduce(AVG)`` per bucket over the group sub-mesh, i.e. with the ranks of the same
    shard index in the other groups. Every rank issues the same collectives in the same order.
    With G = 1 nothing is sent at all (SNOO).

    Stats returned per round (all ranks get the same values; per-rank ones are this rank's):

    * ``bytes_sent``: bytes this rank sends for the pseudo-gradient, counted as a ring
      all-reduce: Σ_buckets 2(G−1)/G · numel · 4 (fp32), i.e. 2(G−1)/G · 4 · P/S for P parameters
      (the few scalars of the statistics are not counted).
    * ``buckets``: collectives issued for Δ (one per bucket).
    * ``group_cosine``: mean over the G groups of cos(Δ_g, Δ̄), Δ̄ = mean_g Δ_g, each over the
      whole model (inner products summed over the S shards).
    * ``pairwise_cosine`` (G = 2 only): cos(Δ_1, Δ_2), derived exactly from the same scalars:
      ⟨Δ_1, Δ_2⟩ = 2⟨Δ_g, Δ̄⟩ − ‖Δ_g‖² (for either g) = 2‖Δ̄‖² − (‖Δ_1‖² + ‖Δ_2‖²)/2.

    The statistics cost one extra all-reduce of 2G + 1 float64 scalars over the world: ‖Δ_g‖²
    and ⟨Δ_g, Δ̄⟩ of each rank's shard (computed while Δ_g is still in the caller's tensors and
    Δ̄ in the bucket), placed at the rank's group slot, plus ‖Δ̄‖²/G.
    """

    def __init__(self, mesh: DeviceMesh, bucket_mb: float = 25.0):
        self.mesh = mesh
        self.groups = mesh["group"].size()
        self.shards = mesh["shard"].size()
        self.group = mesh.get_local_rank("group")
        self.bucket_bytes = int(bucket_mb * 2**20)
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

    @torch.no_grad()
    def average(self, tensors: list[Tensor]) -> dict[str, float]:
        """tensors ← mean_g tensors over the group sub-mesh, in place (see the class docstring)."""
        G = self.groups
        if G == 1:
            return {}
        own_sq = torch.zeros((), dtype=torch.float64, device=self._device)
        own_dot = torch.zeros((), dtype=torch.float64, device=self._device)
        mean_sq = torch.zeros((), dtype=torch.float64, device=self._device)
        sent = 0.0
        n_buckets = 0
        for idx in self.buckets(tensors):
            bucket = [tensors[i] for i in idx]
            numel = sum(t.numel() for t in bucket)
            if numel == 0:
                continue
            flat = torch.cat([t.reshape(-1).to(self._device, torch.float32) for t in bucket])
            own_sq += torch.dot(flat, flat).double()
            dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=self._group_pg)
            mean_sq += torch.dot(flat, flat).double()
            for t, avg in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
                own = t.reshape(-1).to(self._device, torch.float32)
                own_dot += torch.dot(own, avg).double()
                t.copy_(avg.view_as(t))
            sent += ring_allreduce_bytes(numel, G, flat.element_size())
            n_buckets += 1
        # One all-reduce over the world: per-group ‖Δ_g‖² and ⟨Δ_g, Δ̄⟩, and ‖Δ̄‖².
        scalars = torch.zeros(2 * G + 1, dtype=torch.float64, device=self._device)
        scalars[self.group] = own_sq
        scalars[G + self.group] = own_dot
        scalars[2 * G] = mean_sq / G
        dist.all_reduce(scalars)
        sq, dot, mean = scalars[:G], scalars[G : 2 * G], scalars[2 * G]
        cos = dot / (sq.sqrt() * mean.sqrt())
        stats = {"bytes_sent": sent, "buckets": float(n_buckets), "group_cosine": float(cos.mean())}
        if G == 2:
            cross = 2 * mean - sq.sum() / 2
            stats["pairwise_cosine"] = float(cross / (sq[0] * sq[1]).sqrt())
        return stats

    def sum_over_shards(self, value: Tensor) -> Tensor:
        """Sum of a scalar over this group's S shard ranks (an all-reduce when S > 1)."""
        if self.shards == 1:
            return value
        t = value.detach().to(self._device, torch.float64, copy=True)
        dist.all_reduce(t, group=self._shard_pg)
        return t.to(value.device)
