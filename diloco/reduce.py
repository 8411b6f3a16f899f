"""Averaging the pseudo-gradient across worker groups: the seam between the loop and the network.

A reducer averages a list of local tensors *in place* across the G worker groups (never across
the shards of one group: each shard rank averages its own shard with the same shard of the other
groups) and sums scalars across the shards of one group (for norms). The outer step is then
computed identically by every group; there is no parameter server.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

__all__ = ["PseudoGradientReducer", "SingleGroup"]


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
