"""Healing worker groups from live ones: θ, the outer state and the counters, shard by shard.

Members behind the round (restarted, or woken from a stall) receive, on each of their shard ranks,
the matching shard of a current member's state over the quorum's cross-group process group
(:mod:`.membership`): rank s of the donor sends to rank s of the joiner, so nothing is gathered
and each rank moves P/S parameters' worth of state. What is sent (:class:`HealState`):

* ``meta`` — JSON: the shared counters and schedule position (rounds, inner steps, the LR
  schedule's state, the outer optimiser's per-group scalars such as EMA-Nesterov's β), and the
  shape and dtype of every tensor that follows, which the joiner checks;
* ``tensors`` — the slow weights θ and the outer state (Nesterov's b or EMA-Nesterov's m), this
  rank's shards, in a fixed order.

Every member of the round runs :func:`heal` with the same plan (joiner → donor pairs), and every
message is one ``all_to_all_single`` in which only the donor → joiner slices are non-empty: the
bytes are point to point, but the operation is a collective, which can be polled while waiting
(gloo's point-to-point work cannot), so a member that stops answering mid-heal is given up like
one that stops inside the exchange. Messages: a length (int64), the meta bytes (uint8), then each
tensor. Tensors travel from the device the backend needs (CPU for gloo, CUDA for NCCL), staged
through a temporary copy when they live elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from diloco.errors import TopologyError

__all__ = ["HealState", "heal"]


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


def _a2a(
    pg: dist.ProcessGroup,
    n: int,
    send: dict[int, Tensor],
    recv: dict[int, Tensor],
    wait: Callable[[Any], None],
    like: Tensor,
) -> None:
    """One ``all_to_all_single`` over ``pg`` (n ranks): this rank sends ``send[dst]`` (flat) to
    each dst and receives into ``recv[src]`` (flat, its size known) from each src; every other
    slice is empty. ``like``: a tensor of the message's dtype and device."""
    sizes_out = [send[r].numel() if r in send else 0 for r in range(n)]
    sizes_in = [recv[r].numel() if r in recv else 0 for r in range(n)]
    empty = like.new_empty(0)
    inp = torch.cat([send[r].reshape(-1) for r in range(n) if r in send]) if send else empty
    out = like.new_empty(sum(sizes_in))
    wait(dist.all_to_all_single(out, inp, sizes_in, sizes_out, group=pg, async_op=True))
    offset = 0
    for r in range(n):
        if r in recv:
            k = recv[r].numel()
            recv[r].view(-1).copy_(out[offset : offset + k])
            offset += k


def heal(
    pg: dist.ProcessGroup,
    n: int,
    rank: int,
    pairs: list[tuple[int, int]],
    state: HealState,
    device: torch.device,
    wait: Callable[[Any], None],
) -> tuple[int, int, dict[str, Any] | None]:
    """Run one round's healing on this rank of ``pg`` (n ranks), every member the same call.

    ``pairs``: (donor, joiner) ranks. Returns (bytes sent, bytes received, the donor's meta if
    this rank was healed else None); a healed rank's tensors and shared state are the donor's.
    """
    to = [j for d, j in pairs if d == rank]
    source = next((d for d, j in pairs if j == rank), None)
    tensors = state.heal_tensors()  # every member: the same shapes, the same message count
    sent = received = 0
    blob = torch.empty(0, dtype=torch.uint8)
    if to:
        meta = dict(state.heal_meta(), tensors=_describe(tensors))
        blob = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    length = torch.tensor([blob.numel()], dtype=torch.int64, device=device)
    got_length = torch.zeros(1, dtype=torch.int64, device=device)
    _a2a(pg, n, dict.fromkeys(to, length), _only(source, got_length), wait, length)
    got_blob = torch.empty(int(got_length.item()), dtype=torch.uint8, device=device)
    _a2a(pg, n, dict.fromkeys(to, blob.to(device)), _only(source, got_blob), wait, got_blob)
    sent += len(to) * (8 + blob.numel())
    meta = None
    if source is not None:
        received += 8 + got_blob.numel()
        meta = json.loads(got_blob.cpu().numpy().tobytes().decode())
        if meta["tensors"] != _describe(tensors):
            raise TopologyError(
                f"the donor group's state ({len(meta['tensors'])} tensors) does not match this "
                f"group's ({len(tensors)}): every group must run the same model config"
            )
    for t in tensors:
        staged = t.detach().to(device).contiguous()
        buf = torch.empty_like(staged) if source is not None else None
        _a2a(pg, n, dict.fromkeys(to, staged), _only(source, buf), wait, staged)
        if buf is not None:
            t.copy_(buf)
            received += t.numel() * t.element_size()
        sent += len(to) * t.numel() * t.element_size()
    if meta is not None:
        state.load_heal_meta(meta)
    return sent, received, meta


def _only(rank: int | None, t: Tensor | None) -> dict[int, Tensor]:
    """``{rank: t}``, or nothing when this rank receives nothing."""
    return {} if rank is None else {rank: t}
