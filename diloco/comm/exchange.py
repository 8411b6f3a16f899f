"""The bucketed average of Δ over one process group whose rank i is worker group i.

Both reducers run this: :class:`~diloco.comm.mesh.MeshReducer` over the ``"group"`` dim of a
(G, S) device mesh, and :class:`~diloco.comm.elastic.reducer.ElasticReducer` over each round's
quorum. Which process group, how many groups are in it and which of them send a real Δ is a
:class:`Link`; the arithmetic is the same for both.

A rank's local tensors (this shard of every parameter) are packed, in parameter order, into flat
fp32 buckets of at most ``bucket_mb`` MiB (a larger tensor is a bucket of its own); an fp64 run
(``topology.mixed_precision: fp64``) averages uncompressed Δ in fp64 buckets. A bucket of
n members is averaged

* ``compress="none"``: by one fp32 ``all_reduce`` (AVG when every member contributes, else SUM
  divided by the m contributors);
* ``"bf16"``/``"int8"``: by the two-phase exchange of :mod:`diloco.comm.compress` with error
  feedback (the owner of each chunk averages the decoded rows and divides by m).

Members that do not contribute (a group healed this round: its Δ comes from a stale start point)
send zeros (plus their residual, which healing reset to zero) and receive the average like
everybody else.

**Memory.** At most ``window`` buckets are in flight at once in a blocking
:meth:`BucketExchange.run` (each bucket's flat copy is written back into the caller's tensors as
soon as it completes, then freed), so ``bucket_mb`` bounds the extra memory: about
window·bucket_mb per rank (the compressed path also keeps each bucket's new residual until the
round is known to be finite: one fp32 copy of the local shard).
:meth:`BucketExchange.start` (overlapped use, Streaming DiLoCo) issues every bucket at once so that
all of them travel during the inner steps it overlaps with.

**Statistics** (every rank gets the same values): ``bytes_sent`` (this rank, for Δ: fp32 ring
all-reduce 2(n−1)/n·4·numel per bucket, 8 bytes per element in fp64; compressed 2(n−1)·P),
``buckets``, ``group_cosine`` (mean over the contributors of cos(Δ_g, Δ̄), Δ̄ the applied mean,
over the whole model),
``pairwise_cosine`` (two contributors, no compression: cos(Δ_1, Δ_2) from the same scalars:
⟨Δ_1, Δ_2⟩ = 2‖Δ̄‖² − (‖Δ_1‖² + ‖Δ_2‖²)/2), ``residual_norm`` (compressed: sqrt of the members'
mean ‖e_g‖²). They cost one all-reduce of 4n + 3 float64 scalars over every rank (per-member
‖Δ_g‖², ⟨Δ_g, Δ̄⟩ and, when a checksum is asked for, Σθ and Σθ²; then ‖Δ̄‖², Σ‖e‖², and a count of
non-finite means). A blocking run also measures ``reduce_wait_s``: the time a one-element
all-reduce took before the buckets, i.e. the wait for the slowest member, apart from the transfer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from diloco.comm.compress import (
    ErrorFeedback,
    bytes_sent,
    exchange_average,
    exchange_decode,
    exchange_encode,
    make_codec,
)

__all__ = ["BucketExchange", "Exchange", "Link", "wait_for"]


def wait_for(work: Any, timeout_s: float | None = None) -> None:
    """Wait for a collective; with ``timeout_s``, raise RuntimeError if it is not done by then."""
    if timeout_s is None:
        work.wait()
    elif not work.wait(timedelta(seconds=timeout_s)):
        raise RuntimeError(f"a member did not arrive within {timeout_s:g} s")


@dataclass(frozen=True)
class Link:
    """Where one average runs.

    ``pg``: the process group whose rank i is worker group i (this shard index in each);
    ``size``: its n members; ``rank``: this group's rank; ``contributors``: m, how many send a
    real Δ (the divisor); ``contributes``: whether this rank does; ``world_sum``: sums a float64
    vector in place over every rank of every member (each shard of each group);
    ``arrive_timeout_s``: how long a blocking run waits for every member to arrive (None: the
    process group's timeout) — a member that is not coming fails the run instead of hanging it;
    ``wait``: how each collective is waited for, ``wait(work, timeout_s)`` (default: ``work.wait``;
    the elastic reducer's also gives up on a member that stops heartbeating).
    """

    pg: Any
    size: int
    rank: int
    contributors: int
    contributes: bool
    world_sum: Callable[[Tensor], None]
    arrive_timeout_s: float | None = None
    wait: Callable[[Any, float | None], None] = wait_for


@dataclass
class _Bucket:
    idx: list[int]
    numel: int
    work: Any = None
    flat: Tensor | None = None  # none: the bucket being all-reduced in place
    send: Tensor | None = None
    recv: Tensor | None = None
    error: Tensor | None = None  # compressed: the new residual, flat
    res: list[Tensor] = field(default_factory=list)  # compressed: the residual tensors


class BucketExchange:
    """Bucketed averages over a :class:`Link`, with the error-feedback residuals of this rank.

    Args:
        device: where the flat buckets live (the CUDA device with NCCL, else the CPU).
        bucket_mb: bucket size cap, MiB of fp32.
        compress: ``none``, ``bf16`` or ``int8``; ``block``: the int8 block size.
        window: buckets in flight at once in :meth:`run`.
    """

    def __init__(
        self,
        device: torch.device,
        bucket_mb: float = 25.0,
        compress: str = "none",
        block: int = 256,
        window: int = 2,
    ):
        self.device = device
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.compress = compress
        self.block = block
        self.window = window
        self.codec = make_codec(compress, block)
        #: The error-feedback residuals (None without compression).
        self.error_feedback: ErrorFeedback | None = ErrorFeedback() if self.codec else None

    def buckets(self, tensors: list[Tensor], itemsize: int = 4) -> list[list[int]]:
        """Indices of ``tensors`` per bucket: consecutive, at most ``bucket_mb`` MiB each of
        ``itemsize``-byte elements (fp32: 4)."""
        out: list[list[int]] = []
        size = 0
        for i, t in enumerate(tensors):
            nbytes = t.numel() * itemsize
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
        return self.error_feedback.get(ids, like, self.device)

    def forget_residuals(self) -> None:
        """Drop every residual (a healed group owes nothing from its stale rounds)."""
        if self.error_feedback is not None:
            self.error_feedback.residuals.clear()

    @torch.no_grad()
    def run(
        self,
        tensors: list[Tensor],
        ids: Sequence[int] | None,
        link: Link,
        checksum: list[Tensor] | None = None,
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Average ``tensors`` in place over ``link``, ``window`` buckets at a time.

        Returns the statistics and ``commit``, which stores the new error-feedback residuals
        (call it once the round is accepted; a finite round only). ``checksum``: tensors whose
        (Σx, Σx²) every member compares (``theta_mismatch`` in the stats: the index of the
        first member that disagrees with member 0).
        """
        t0 = time.perf_counter()
        probe = torch.zeros(1, device=self.device)
        link.wait(dist.all_reduce(probe, group=link.pg, async_op=True), link.arrive_timeout_s)
        wait_s = time.perf_counter() - t0
        ex = self.start(tensors, ids, link, window=self.window)
        stats, commit = ex.finish(checksum)
        stats["reduce_wait_s"] = wait_s
        return stats, commit

    @torch.no_grad()
    def start(
        self,
        tensors: list[Tensor],
        ids: Sequence[int] | None,
        link: Link,
        window: int | None = None,
    ) -> Exchange:
        """Issue the first ``window`` buckets (None: all of them); :meth:`Exchange.finish`
        completes the average."""
        ids = list(range(len(tensors))) if ids is None else list(ids)
        if len(ids) != len(tensors):
            raise ValueError(f"{len(ids)} ids for {len(tensors)} tensors")
        return Exchange(self, tensors, ids, link, window)


class Exchange:
    """One average in flight (made by :meth:`BucketExchange.start`)."""

    def __init__(
        self, owner: BucketExchange, tensors: list[Tensor], ids: list[int], link: Link,
        window: int | None,
    ):  # fmt: skip
        self.x, self.tensors, self.link = owner, tensors, link
        dev = owner.device
        self.residuals = owner.residuals(tensors, ids)
        #: The dtype Δ travels in: fp32, or fp64 for fp64 tensors without compression.
        wide = owner.codec is None and any(t.dtype == torch.float64 for t in tensors)
        self.dtype = torch.float64 if wide else torch.float32
        self.todo = deque(
            _Bucket(idx, sum(tensors[i].numel() for i in idx))
            for idx in owner.buckets(tensors, self.dtype.itemsize)
            if sum(tensors[i].numel() for i in idx) > 0
        )
        self.done: list[_Bucket] = []
        self.in_flight: deque[_Bucket] = deque()
        self.window = window
        self.sent = 0.0
        self.own_sq = torch.zeros((), dtype=torch.float64, device=dev)
        self.own_dot = torch.zeros((), dtype=torch.float64, device=dev)
        self.mean_sq = torch.zeros((), dtype=torch.float64, device=dev)
        self.err_sq = torch.zeros((), dtype=torch.float64, device=dev)
        self.finite = torch.ones((), dtype=torch.bool, device=dev)
        self._finished = False
        self._fill()

    # ------------------------------------------------------------------ pipeline
    def _fill(self) -> None:
        while self.todo and (self.window is None or len(self.in_flight) < self.window):
            b = self.todo.popleft()
            self._issue(b)
            self.in_flight.append(b)

    def _issue(self, b: _Bucket) -> None:
        x, link = self.x, self.link
        n, m = link.size, link.contributors
        bucket = [self.tensors[i] for i in b.idx]
        if link.contributes:
            flat = torch.cat([t.reshape(-1).to(x.device, self.dtype) for t in bucket])
            self.own_sq += torch.dot(flat, flat).double()
        else:
            flat = torch.zeros(b.numel, dtype=self.dtype, device=x.device)
        if x.codec is None:
            op = dist.ReduceOp.AVG if m == n else dist.ReduceOp.SUM
            b.work = dist.all_reduce(flat, op=op, group=link.pg, async_op=True)
            b.flat = flat
        else:
            b.res = [self.residuals[i] for i in b.idx]
            flat += torch.cat([e.reshape(-1) for e in b.res])  # x = Δ + e (a healed group: e)
            send, b.error = exchange_encode(flat, n, x.codec)
            del flat
            b.recv = torch.empty_like(send)
            b.work = dist.all_to_all_single(b.recv, send, group=link.pg, async_op=True)
            b.send = send  # kept alive until the collective completes
        self.sent += bytes_sent(b.numel, n, x.compress, x.block, self.dtype.itemsize)

    def _complete(self, b: _Bucket) -> None:
        """Finish bucket ``b``: its mean into the caller's tensors, its statistics."""
        x, link = self.x, self.link
        n, m = link.size, link.contributors
        codec = x.codec
        link.wait(b.work, None)
        if codec is None:
            mean = b.flat
            if m != n:
                mean /= m
        else:  # phase 2: the owner's average of its chunk, re-encoded and gathered
            b.send = None
            c = codec.chunk(b.numel, n)
            payload, owner_error = exchange_average(b.recv, n, c, codec, divisor=m)
            lo = link.rank * c
            hi = min(lo + c, b.numel)
            if hi > lo:  # e_j[chunk j] += m·(a_j − t_j)
                b.error[lo:hi] += m * owner_error[: hi - lo]
            gathered = torch.empty((n, payload.shape[1]), dtype=torch.uint8, device=x.device)
            link.wait(
                dist.all_gather_into_tensor(gathered, payload, group=link.pg, async_op=True), None
            )
            mean = exchange_decode(gathered, b.numel, codec)
            self.err_sq += torch.dot(b.error, b.error).double()
        self.mean_sq += torch.dot(mean, mean).double()
        self.finite &= torch.isfinite(mean).all()
        bucket = [self.tensors[i] for i in b.idx]
        for t, avg in zip(bucket, mean.split([t.numel() for t in bucket]), strict=True):
            if link.contributes:
                own = t.reshape(-1).to(x.device, self.dtype)
                self.own_dot += torch.dot(own, avg).double()
            t.copy_(avg.view_as(t))
        b.flat = b.recv = b.send = b.work = None
        if codec is None:
            b.error = None
        self.done.append(b)

    # ------------------------------------------------------------------ result
    @torch.no_grad()
    def finish(
        self, checksum: list[Tensor] | None = None
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Complete every bucket and the statistics; (stats, commit) as in
        :meth:`BucketExchange.run`."""
        if self._finished:
            raise RuntimeError("finish() was already called on this exchange")
        self._finished = True
        while self.in_flight:
            self._complete(self.in_flight.popleft())
            self._fill()
        return self._stats(checksum), self._commit

    def wait(self) -> dict[str, Any]:
        """Finish and commit at once (the mesh reducer's handle)."""
        stats, commit = self.finish()
        commit()
        return stats

    def _stats(self, checksum: list[Tensor] | None) -> dict[str, Any]:
        link, dev = self.link, self.x.device
        n, i = link.size, link.rank
        # [‖Δ_g‖² ×n][⟨Δ_g, Δ̄⟩ ×n][Σθ ×n][Σθ² ×n][‖Δ̄‖²/n][Σ‖e‖²/n][non-finite]
        s = torch.zeros(4 * n + 3, dtype=torch.float64, device=dev)
        s[i] = self.own_sq
        s[n + i] = self.own_dot
        if checksum:
            for t in checksum:
                v = t.detach().to(dev, torch.float64)
                s[2 * n + i] += v.sum()
                s[3 * n + i] += v.square().sum()
        s[4 * n] = self.mean_sq / n
        s[4 * n + 1] = self.err_sq / n
        s[4 * n + 2] = (~self.finite).double()
        link.world_sum(s)
        s = s.cpu()
        sq, dot = s[:n], s[n : 2 * n]
        mean_sq = s[4 * n]
        contributing = sq > 0
        cos = dot[contributing] / (sq[contributing].sqrt() * mean_sq.sqrt())
        stats: dict[str, Any] = {
            "bytes_sent": self.sent,
            "buckets": float(len(self.done)),
            "group_cosine": float(cos.mean()) if contributing.any() else float("nan"),
        }
        if checksum:
            ref = s[[2 * n, 3 * n]]
            for j in range(1, n):
                if not torch.allclose(s[[2 * n + j, 3 * n + j]], ref, rtol=1e-6, atol=1e-12):
                    stats["theta_mismatch"] = j
                    break
            stats["theta_sumsq"] = float(s[3 * n + i])
        self.nonfinite = float(s[4 * n + 2]) != 0
        if self.x.codec is None:
            if n == 2 and link.contributors == 2:
                cross = 2 * mean_sq - sq.sum() / 2
                stats["pairwise_cosine"] = float(cross / (sq[0] * sq[1]).sqrt())
        else:
            stats["residual_norm"] = float(s[4 * n + 1].sqrt())
        return stats

    def _commit(self) -> None:
        """Store the new residuals (a round with a non-finite mean keeps the old ones)."""
        if self.x.codec is None or self.nonfinite:
            return
        for b in self.done:
            if b.res:
                for e, new in zip(b.res, b.error.split([e.numel() for e in b.res]), strict=True):
                    e.copy_(new.view_as(e))
            b.error = None
