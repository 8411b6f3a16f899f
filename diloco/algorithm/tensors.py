"""The one helper for this rank's storage of a (possibly FSDP2-sharded) tensor."""

from __future__ import annotations

from torch import Tensor

__all__ = ["local_tensor"]


def local_tensor(t: Tensor) -> Tensor:
    """This rank's storage of ``t``, detached: the local shard of a DTensor (FSDP2), else ``t``
    itself. Shares ``t``'s storage (no copy)."""
    to_local = getattr(t, "to_local", None)
    return (to_local() if to_local is not None else t).detach()
