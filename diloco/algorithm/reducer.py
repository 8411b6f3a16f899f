"""The seam between the loop and the network: how the pseudo-gradient is averaged across groups.

A reducer averages a list of local tensors *in place* across the G worker groups (never across
the shards of one group) and sums scalars across the shards of one group (for norms). Every
reducer also has an asynchronous form for overlapping communication with compute:
``handle = reducer.start_average(tensors)`` issues the collectives and returns at once;
``handle.wait()`` finishes them, writes the average into ``tensors`` and returns the stats.
``reducer.average(tensors)`` is ``start_average(tensors).wait()``.

The wrapper (:mod:`diloco.algorithm.wrapper`) and Streaming DiLoCo only see these protocols.
:class:`SingleGroup` (one group: SNOO, or no process group) is here; the reducer over a device
mesh is :class:`diloco.comm.mesh.MeshReducer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor

__all__ = ["Done", "PendingAverage", "PseudoGradientReducer", "SingleGroup"]


class PendingAverage(Protocol):
    """An average in flight (see :meth:`PseudoGradientReducer.start_average`)."""

    def wait(self) -> dict[str, float]:
        """Finish the collectives, write the average into the tensors, return the stats."""
        ...


class PseudoGradientReducer(Protocol):
    """How the pseudo-gradient Δ_g of each group becomes mean_g Δ_g."""

    groups: int

    def average(self, tensors: list[Tensor], ids: Sequence[int] | None = None) -> dict[str, float]:
        """tensors ← mean over groups, in place; returns per-round stats (bytes sent, cosine).

        ``ids``: the tensors' indices in the model's parameter list (they key the
        error-feedback residuals of a compressing reducer); default ``0 .. len(tensors) − 1``.
        """
        ...

    def start_average(
        self, tensors: list[Tensor], ids: Sequence[int] | None = None
    ) -> PendingAverage:
        """Issue :meth:`average`'s collectives; the handle's ``wait()`` completes it."""
        ...

    def sum_over_shards(self, value: Tensor) -> Tensor:
        """Sum of a scalar over the shard ranks of this group."""
        ...


class Done:
    """An average that needed no communication."""

    def wait(self) -> dict[str, float]:
        return {}


class SingleGroup:
    """One group of one rank (SNOO, or no process group): nothing to send."""

    groups = 1

    def average(self, tensors: list[Tensor], ids: Sequence[int] | None = None) -> dict[str, float]:
        return {}

    def start_average(self, tensors: list[Tensor], ids: Sequence[int] | None = None) -> Done:
        return Done()

    def sum_over_shards(self, value: Tensor) -> Tensor:
        return value
