"""Helpers for the wrapper's tensors: this rank's storage of a (possibly FSDP2-sharded)
tensor, and the shape check of a saved state."""

from __future__ import annotations

from torch import Tensor

from diloco.errors import CheckpointError

__all__ = ["check_shapes", "local_tensor"]


def local_tensor(t: Tensor) -> Tensor:
    """This rank's storage of ``t``, detached: the local shard of a DTensor (FSDP2), else ``t``
    itself. Shares ``t``'s storage (no copy)."""
    to_local = getattr(t, "to_local", None)
    return (to_local() if to_local is not None else t).detach()


def check_shapes(what: str, saved: list[Tensor], current: list[Tensor]) -> None:
    """Raise CheckpointError unless the saved tensors match the current ones in number and
    shape (a state from a different model)."""
    if len(saved) != len(current):
        raise CheckpointError(
            f"{what}: saved state has {len(saved)} tensors, the model has {len(current)}; "
            "it comes from a different model shape"
        )
    for i, (a, b) in enumerate(zip(saved, current, strict=True)):
        if a.shape != b.shape:
            raise CheckpointError(
                f"{what}: tensor {i} has shape {tuple(a.shape)} in the saved state but "
                f"{tuple(b.shape)} in the model; it comes from a different model shape"
            )
