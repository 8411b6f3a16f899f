"""Healing a worker group from a live one: θ, the outer state and the counters, point to point.

A group that joins behind the others (restarted, or woken from a stall) receives, on each of its
shard ranks, the matching shard of a current member over the quorum's cross-group process group
(:mod:`.membership`): rank s of the donor sends to rank s of the joiner, so nothing is gathered
and each rank moves P/S parameters' worth of state. What is sent (:class:`HealState`):

* ``meta`` — JSON: the shared counters and schedule position (rounds, inner steps, the LR
  schedule's state, the outer optimiser's per-group scalars such as EMA-Nesterov's β), and the
  shape and dtype of every tensor that follows, which the joiner checks before receiving;
* ``tensors`` — the slow weights θ and the outer state (Nesterov's b or EMA-Nesterov's m), this
  rank's shards, in a fixed order.

Message order on the process group: a length header (int64), the meta bytes (uint8), then each
tensor, with tags 0, 1, 2, … . Tensors travel from the device the backend needs (CPU for gloo,
CUDA for NCCL), staged through a temporary copy when they live elsewhere.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from diloco.errors import TopologyError

__all__ = ["HealState", "send_state", "recv_state"]


class HealState(Protocol):
    """What a worker group shares with a joiner (implemented by the training job)."""

    def rounds(self) -> int:
        """Outer rounds completed."""
        ...

    def trained(self) -> bool:
        """Holds trained slow weights (a round done, or restored from a checkpoint)."""
        ...

    def heal_tensors(self) -> list[Tensor]:
        """θ and the outer state, this rank's shards, in a fixed order (allocated if lazy)."""
        ...

    def heal_meta(self) -> dict[str, Any]:
        """The JSON-able shared state (counters, schedule position)."""
        ...

    def load_heal_meta(self, meta: dict[str, Any]) -> None:
        """Adopt a donor's shared state (after its tensors were received)."""
        ...

    def checksum_tensors(self) -> list[Tensor]:
        """The slow weights θ (compared across groups every round)."""
        ...


def _describe(tensors: list[Tensor]) -> list[list]:
    return [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in tensors]


def _staged(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device and t.is_contiguous() else t.detach().to(device).contiguous()


def send_state(pg: dist.ProcessGroup, dst: int, state: HealState, device: torch.device) -> int:
    """Send this rank's shared state to rank ``dst`` of ``pg``; returns the bytes sent.

    Each message is waited for with ``work.wait()``: gloo moves point-to-point data inside
    ``wait`` (its work is not completed by polling), so healing is not watched for a silent
    peer; a dead one fails at once, a stopped one after the process group's timeout."""
    tensors = state.heal_tensors()
    meta = dict(state.heal_meta(), tensors=_describe(tensors))
    blob = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    header = torch.tensor([blob.numel()], dtype=torch.int64)
    pg.send([header.to(device)], dst, 0).wait()
    pg.send([blob.to(device)], dst, 1).wait()
    sent = header.numel() * 8 + blob.numel()
    for i, t in enumerate(tensors):
        pg.send([_staged(t, device)], dst, 2 + i).wait()
        sent += t.numel() * t.element_size()
    return sent


def recv_state(
    pg: dist.ProcessGroup, src: int, state: HealState, device: torch.device
) -> tuple[dict[str, Any], int]:
    """Receive rank ``src``'s shared state into this rank's tensors; returns (meta, bytes)."""
    header = torch.zeros(1, dtype=torch.int64, device=device)
    pg.recv([header], src, 0).wait()
    blob = torch.empty(int(header.item()), dtype=torch.uint8, device=device)
    pg.recv([blob], src, 1).wait()
    meta = json.loads(blob.cpu().numpy().tobytes().decode())
    tensors = state.heal_tensors()
    if meta["tensors"] != _describe(tensors):
        raise TopologyError(
            f"the donor group's state ({len(meta['tensors'])} tensors) does not match this "
            f"group's ({len(tensors)}): every group must run the same model config"
        )
    received = header.numel() * 8 + blob.numel()
    for i, t in enumerate(tensors):
        buf = t if t.device == device and t.is_contiguous() else torch.empty_like(t, device=device)
        pg.recv([buf], src, 2 + i).wait()
        if buf is not t:
            t.copy_(buf)
        received += t.numel() * t.element_size()
    state.load_heal_meta(meta)
    return meta, received
