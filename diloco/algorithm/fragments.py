"""Streaming DiLoCo's fragments and their schedule (pure functions of names, shapes, K, P, τ).

**Fragments.** The trainable parameters are split into P fragments, from their *names* in
``model.named_parameters()`` order (identical on every rank, whatever the sharding):

* a parameter inside transformer block j (the first all-digit component of its dotted name,
  e.g. ``blocks.3.attn.c_attn.weight`` → j = 3) goes to fragment j mod P (strided: fragment i
  holds blocks i, i + P, i + 2P, …);
* every other parameter (token and position embeddings — the tied LM head is the token
  embedding — and the final norm) goes, in name order, to the fragment with the fewest elements
  so far (ties: the lowest index), counting global shapes. The fragments' sizes stay as even as
  whole tensors allow, so peak traffic is close to 1/P of a full sync.

**Schedule** (exact). K = ``sync_every``, P = ``fragments``, τ = ``sync_delay``; K mod P = 0 and
0 ≤ τ < K/P. Within each period of K inner steps fragment i has

    apply offset  a_i = (i + 1)·K/P mod K     (the last fragment: 0, the period boundary)
    start offset  o_i = (a_i − τ) mod K

its average starts at offset o_i and is applied τ steps later, at a_i
(:class:`diloco.algorithm.streaming.StreamingDiLoCo`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "assign_fragments",
    "block_index",
    "fragment_schedule",
    "streaming_enabled",
    "streaming_options",
]

_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def streaming_enabled(outer: Any) -> bool:
    """Whether an ``outer`` config section asks for :class:`StreamingDiLoCo`."""
    return outer.fragments > 1 or outer.sync_delay > 0 or outer.mix_alpha > 0


def block_index(name: str) -> int | None:
    """The block a parameter belongs to: the first all-digit component of its name, or None."""
    m = _BLOCK_INDEX.search(name)
    return int(m.group(1)) if m else None


def assign_fragments(
    names: Sequence[str], shapes: Sequence[Sequence[int]], fragments: int
) -> list[int]:
    """The fragment of each parameter (see the module docstring), from names and global shapes."""
    if fragments < 1:
        raise ValueError(f"fragments must be >= 1, got {fragments}")
    numels = [math.prod(s) for s in shapes]
    out = [-1] * len(names)
    sizes = [0] * fragments
    for k, name in enumerate(names):
        j = block_index(name)
        if j is not None:
            out[k] = j % fragments
            sizes[out[k]] += numels[k]
    for k in range(len(names)):
        if out[k] < 0:
            out[k] = min(range(fragments), key=lambda i: (sizes[i], i))
            sizes[out[k]] += numels[k]
    return out


def fragment_schedule(sync_every: int, fragments: int, sync_delay: int) -> list[tuple[int, int]]:
    """``(start offset o_i, apply offset a_i)`` of each fragment, both in [0, K).

    a_i = (i + 1)·K/P mod K and o_i = (a_i − τ) mod K. Raises ValueError unless K mod P = 0 and
    0 ≤ τ < K/P.
    """
    K, P, tau = sync_every, fragments, sync_delay
    if P < 1 or K % P:
        raise ValueError(f"sync_every ({K}) must be divisible by fragments ({P})")
    if not 0 <= tau < K // P:
        raise ValueError(f"sync_delay ({tau}) must be in [0, sync_every / fragments = {K // P})")
    return [(((i + 1) * K // P - tau) % K, (i + 1) * K // P % K) for i in range(P)]


def streaming_options(outer: Any) -> dict[str, Any]:
    """:class:`StreamingDiLoCo`'s extra arguments from an ``outer`` config section, or ``{}``
    when it asks for plain DiLoCo (``fragments=1, sync_delay=0, mix_alpha=0``)."""
    if not streaming_enabled(outer):
        return {}
    return {
        "fragments": outer.fragments,
        "sync_delay": outer.sync_delay,
        "mix_alpha": outer.mix_alpha,
    }
