"""Streaming DiLoCo: fragments synchronised at staggered times, each reduction overlapped with
τ further inner steps (arXiv 2501.18512, 2502.12996; torchft's ``DiLoCo(model_fragments=…,
fragment_sync_delay=τ, fragment_update_alpha=α)`` is the public reference).

The P fragments of the parameters, and each fragment's start offset o_i and apply offset a_i
in the period of K = ``sync_every`` inner steps (τ = ``sync_delay`` apart), are
:mod:`diloco.algorithm.fragments`'. The outer optimiser gets one param group per fragment, so
fragment i's outer state (momentum b, or EMA m with its own β and round count) is stepped only with
fragment i (``outer.step(group=i)``); the maths is :mod:`diloco.algorithm.outer`'s, unchanged.

n counts inner steps from the start of training. After inner step n (in this order, each in
fragment-index order, on every rank):

1. every fragment with n mod K = o_i *starts*: Δ_i = s_i − φ_i(n) is formed into a separate
   buffer (the fast weights keep training) and its average across groups is started
   asynchronously (``reducer.start_average``);
2. every fragment with n mod K = a_i that has an average in flight is *applied*: wait for the
   average, outer step on θ_i with it, then the fast weights restart as
   φ_i ← α·φ_i(n) + (1 − α)·s_i' (α = ``mix_alpha``; s_i' the new start point);
3. if n mod K = 0 the period (a round: ``outer_steps`` counts them) ends and :meth:`step`
   returns its :class:`SyncReport`.

So fragment i's reduction runs during the τ inner steps n + 1 … n + τ after its start and is
applied τ steps later. Since τ < K/P, at most one fragment is in flight at any time (one Δ
buffer, sized like the largest fragment, serves all), and **none is in flight at a period
boundary**: the last fragment is applied exactly there. Checkpoints are taken at period
boundaries (``train.checkpoint_every`` counts periods), so they never hold a reduction in flight;
they do hold the fast weights, which at a boundary differ from the start point (fragments
applied earlier in the period kept training, and α > 0 mixes local weights in).

With P = 1, τ = 0, α = 0 this is plain DiLoCo, op for op (same Δ, same collective, same outer
step, same restart); tests check it bit for bit. With α = 0 and τ > 0 the τ local steps a
fragment took while its average was in flight are dropped at the restart (as torchft with
α = 0); α > 0 keeps that share of them.

Every rank issues its fragments' collectives in the same fixed order (fragment-index order at the
same step counts), so fragments cannot be reduced in different orders (torchft #206/#209);
:attr:`StreamingDiLoCo.events` records ``(inner step, fragment, "start" | "apply")``.

:meth:`StreamingDiLoCo.sync` (the end of a run on a partial period) applies a fragment in
flight at once and synchronises, synchronously, each fragment whose apply offset lies ahead in
this period; fragments applied earlier in the period are left as they are.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diloco.algorithm.fragments import assign_fragments, fragment_schedule
from diloco.algorithm.outer import EMANesterov
from diloco.algorithm.reducer import PendingAverage
from diloco.algorithm.wrapper import DiLoCo, SyncReport
from diloco.errors import CheckpointError, DilocoError

__all__ = ["StreamingDiLoCo"]


@dataclass
class _InFlight:
    """A fragment whose average has been started and not yet applied."""

    handle: PendingAverage
    step: int  # inner step after which it started
    delta_s: float
    launch_s: float


@dataclass
class _Period:
    """What the fragments applied in the current period did (for its SyncReport)."""

    sq: list[Tensor] = field(default_factory=list)  # per fragment: ‖Δ_i‖² (float64, all shards)
    skipped: bool = False
    delta_s: float = 0.0
    reduce_s: float = 0.0
    outer_s: float = 0.0
    stats: list[dict[str, float]] = field(default_factory=list)


class StreamingDiLoCo(DiLoCo):
    """DiLoCo with P fragments synced at staggered offsets and τ-step overlapped reductions.

    Takes :class:`~diloco.algorithm.wrapper.DiLoCo`'s arguments plus:

    Args:
        fragments: P; K = ``sync_every`` must be divisible by it.
        sync_delay: τ inner steps between starting a fragment's average and applying it
            (0 ≤ τ < K/P; 0: synchronous).
        mix_alpha: α in [0, 1]: at apply time φ_i ← α·φ_i + (1 − α)·s_i'.

    Memory: besides DiLoCo's θ and outer state, one Δ buffer of the largest fragment's size
    (≈ 1/P of the model for even fragments; the whole model for P = 1), plus the reducer's own
    flat copy of the fragment while it is in flight. Fragments come from parameter names, so a
    ``fast_tensors`` provider (an engine's flat partitions) only works with P = 1.

    ``step()`` returns a report once per period (at n mod K = 0), summing over the fragments
    applied in it: ``pseudo_grad_norm`` = sqrt(Σ_i ‖Δ_i‖²), ``skipped`` if any fragment's Δ was
    non-finite (that fragment's outer step is skipped and its fast weights go back to its start
    point), times summed, and reducer stats with ``bytes_sent`` summed over the fragments,
    ``peak_bytes`` the largest single fragment's, ``fragments`` the count, other numbers
    averaged over the fragments.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        fragments: int = 1,
        sync_delay: int = 0,
        mix_alpha: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(model, inner_optimizer, **kwargs)
        if self.outer is None:
            raise ValueError("streaming needs an outer step; outer='none' has none")
        if not 0.0 <= mix_alpha <= 1.0:
            raise ValueError(f"mix_alpha must be in [0, 1], got {mix_alpha}")
        self.schedule = fragment_schedule(self.sync_every, fragments, sync_delay)
        if fragments > 1 and self._fast_provider is not None:
            raise ValueError(
                "streaming fragments are cut from parameter names; with a fast_tensors provider "
                "(e.g. DeepSpeed's flat partitions) only fragments=1 is supported"
            )
        self.fragments = fragments
        self.sync_delay = sync_delay
        self.mix_alpha = float(mix_alpha)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if fragments > 1:
            of = assign_fragments(
                [n for n, _ in named], [tuple(p.shape) for _, p in named], fragments
            )
        else:
            of = [0] * len(self.outer.slow_tensors())
        #: Parameter indices (model order) of each fragment.
        self.fragment_params: list[list[int]] = [
            [k for k, f in enumerate(of) if f == i] for i in range(fragments)
        ]
        self._slow = self.outer.slow_tensors()  # parameter order (one group so far)
        self.outer = self.outer.regrouped(
            [[self._slow[k] for k in idx] for idx in self.fragment_params]
        )
        numels = [sum(self._slow[k].numel() for k in idx) for idx in self.fragment_params]
        ref = self._slow[0]  # θ's device: the host when offloaded (the buffer is then pinned)
        self._buffer = torch.empty(
            max(numels), dtype=ref.dtype, device=ref.device, pin_memory=self._pin
        )
        self._views: list[list[Tensor]] = []
        for idx in self.fragment_params:
            views, at = [], 0
            for k in idx:
                t = self._slow[k]
                views.append(self._buffer[at : at + t.numel()].view(t.shape))
                at += t.numel()
            self._views.append(views)
        self._starts: dict[int, list[int]] = {}
        self._applies: dict[int, list[int]] = {}
        for i, (o, a) in enumerate(self.schedule):
            self._starts.setdefault(o, []).append(i)
            self._applies.setdefault(a, []).append(i)
        self._in_flight: dict[int, _InFlight] = {}
        self._period = _Period()
        #: The last 4096 ``(inner step, fragment, "start" | "apply")``, in the order they happened.
        self.events: deque[tuple[int, int, str]] = deque(maxlen=4096)

    # ------------------------------------------------------------------ views
    def slow_tensors(self) -> list[Tensor]:
        """This rank's slow weights θ, in parameter order (the outer groups are per fragment)."""
        return list(self._slow)

    @property
    def in_flight(self) -> int:
        """Fragments whose average has started and not been applied (0 at period boundaries)."""
        return len(self._in_flight)

    def fragment_numels(self) -> list[int]:
        """Elements of each fragment on this rank (local shards)."""
        return [sum(self._slow[k].numel() for k in idx) for idx in self.fragment_params]

    # ------------------------------------------------------------------ stepping
    def step(self, closure: Any = None) -> SyncReport | None:
        """One inner step, then the starts and applies due after it (module docstring)."""
        self._inner_step(closure)
        self.steps_in_round += 1
        phase = self.inner_steps % self.sync_every
        with torch.no_grad():
            for i in self._starts.get(phase, ()):
                self._start(i)
            for i in self._applies.get(phase, ()):
                if i in self._in_flight:
                    self._apply(i)
        return self._end_period() if phase == 0 else None

    @torch.no_grad()
    def sync(self) -> SyncReport | None:
        """End the period now: apply the fragment in flight, then synchronise (start and apply
        at once) every fragment whose apply offset is still ahead in this period, in index
        order. A no-op (None) right after a period boundary."""
        self._check_not_holding_slow("sync()")
        if self.steps_in_round == 0:
            return None
        phase = self.inner_steps % self.sync_every
        for i, (_, a) in enumerate(self.schedule):
            if i in self._in_flight:
                self._apply(i)
            elif phase < (a or self.sync_every):
                self._start(i)
                self._apply(i)
        return self._end_period()

    def _fast(self, i: int, fast: list[Tensor] | None = None) -> list[Tensor]:
        fast = self.fast_tensors() if fast is None else fast
        return [fast[k] for k in self.fragment_params[i]]

    def _start(self, i: int) -> None:
        """Δ_i = s_i − φ_i into the buffer (as DiLoCo forms it in place), start its average."""
        t0 = self._now()
        work = self._views[i]
        torch._foreach_copy_(work, self._fast(i))
        torch._foreach_mul_(work, -1.0)
        torch._foreach_add_(work, self.outer.slow_tensors(i))
        self.outer.add_lookahead(work, group=i)
        t1 = self._now()
        handle = self.reducer.start_average(work, self.fragment_params[i])
        t2 = self._now()
        self._in_flight[i] = _InFlight(handle, self.inner_steps, t1 - t0, t2 - t1)
        self.events.append((self.inner_steps, i, "start"))

    def _apply(self, i: int) -> None:
        """Wait for fragment i's average, take its outer step, restart its fast weights."""
        job = self._in_flight.pop(i)
        t0 = self._now()
        stats = job.handle.wait()
        t1 = self._now()
        work = self._views[i]
        sq = self._squared_norm(work)
        slow = self.outer.slow_tensors(i)
        fast = self._fast(i)
        if math.isfinite(float(sq)):
            for p, d in zip(slow, work, strict=True):
                p.grad = d
            self.outer.step(group=i)
            for p in slow:
                p.grad = None
            if isinstance(self.outer, EMANesterov):
                self.outer.set_beta(self._next_beta(), group=i)
            self._restart(i, fast)
        else:  # skipped: back to the unchanged start point of this fragment
            self._period.skipped = True
            self._write_start(i, fast)
        self._after_fast_write()
        t2 = self._now()
        p = self._period
        p.sq.append(sq)
        p.delta_s += job.delta_s
        p.reduce_s += job.launch_s + (t1 - t0)
        p.outer_s += t2 - t1
        p.stats.append(stats)
        self.events.append((self.inner_steps, i, "apply"))

    def _restart(self, i: int, fast: list[Tensor]) -> None:
        """φ_i ← α·φ_i + (1 − α)·s_i' (α = 0: φ_i ← s_i', exactly)."""
        if self.mix_alpha == 0.0:
            self._write_start(i, fast)
            return
        start = self._views[i]  # Δ_i is consumed: the buffer holds s_i' now
        self.outer.write_start(start, group=i)
        if self.offload != "none":  # s_i' is on the host: one copy to the fast weights' device
            start = [
                s.to(f.device, copy=True, non_blocking=True)
                for s, f in zip(start, fast, strict=True)
            ]
        torch._foreach_lerp_(fast, start, 1.0 - self.mix_alpha)

    def _write_start(self, i: int, fast: list[Tensor]) -> None:
        """φ_i ← s_i. Offloaded, s_i = θ_i (+ β·m_i) is formed on the host, in fragment i's
        views of the Δ buffer (no fragment is in flight, or Δ_i is consumed), and copied over
        once, as DiLoCo does; the host buffers never meet the fast weights in one op."""
        if self.offload == "none":
            self.outer.write_start(fast, group=i)
            return
        start = self._views[i]
        self.outer.write_start(start, group=i)
        torch._foreach_copy_(fast, start, non_blocking=True)

    def _squared_norm(self, tensors: list[Tensor]) -> Tensor:
        """‖Δ_i‖² over the whole fragment (this group's shards summed), float64 scalar; computed
        as DiLoCo computes ‖Δ‖, so P = 1 reports the same norm bit for bit."""
        if tensors:
            sq = torch.stack(torch._foreach_norm(tensors)).double().square().sum()
        else:
            sq = torch.zeros((), dtype=torch.float64, device=self._buffer.device)
        return self.reducer.sum_over_shards(sq)

    def _end_period(self) -> SyncReport | None:
        p, self._period = self._period, _Period()
        if not p.sq:  # nothing was applied in this period (only after a user's early sync)
            self.steps_in_round = 0
            return None
        norm = float(torch.stack(p.sq).sum().sqrt())
        stats = _merge_stats(p.stats)
        return self._close_round(norm, p.skipped, p.delta_s, p.reduce_s, p.outer_s, stats)

    # ------------------------------------------------------------------ evaluation
    def _fast_equals_slow(self) -> bool:
        return self.fragments == 1 and self.mix_alpha == 0.0 and super()._fast_equals_slow()

    # ------------------------------------------------------------------ state
    #: Checkpoints must store the fast weights: at a period boundary they are not the start point.
    checkpoint_fast_weights = True

    def checkpoint_blocker(self) -> str | None:
        """Checkpoints are taken at period boundaries, where no average is in flight."""
        return "a fragment's average is still in flight" if self._in_flight else None

    def _check_idle(self, what: str) -> None:
        if self._in_flight:
            raise DilocoError(
                f"cannot {what} with fragment averages in flight (fragments "
                f"{sorted(self._in_flight)}); do it at a period boundary (inner step mod "
                f"sync_every == 0) or after sync()"
            )

    def state_dict(self) -> dict[str, Any]:
        """DiLoCo's state plus the fast weights (always) and the streaming settings."""
        self._check_idle("save the state")
        sd = super().state_dict()
        sd["fast"] = [t.clone() for t in self.fast_tensors()]
        sd["streaming"] = {
            "fragments": self.fragments,
            "sync_delay": self.sync_delay,
            "mix_alpha": self.mix_alpha,
        }
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (or the checkpointer's equivalent); the fast weights
        come from ``sd["fast"]`` when present, else restart at each fragment's start point."""
        super().load_state_dict(sd)
        self._period = _Period()

    def _check_state(self, sd: dict[str, Any]) -> None:
        self._check_idle("load a state")
        super()._check_state(sd)
        groups = len(sd["outer"]["param_groups"])
        if groups != self.fragments:
            raise CheckpointError(
                f"outer state has {groups} param groups (fragments), this run has {self.fragments}"
            )

    def _restart_all(self, fast: list[Tensor]) -> None:
        for i in range(self.fragments):
            self._write_start(i, self._fast(i, fast))


_SUMMED = ("bytes_sent", "buckets")


def _merge_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """One period's reducer stats from its fragments' (module docstring of the class)."""
    stats = [s for s in stats if s]
    if not stats:
        return {}
    out: dict[str, float] = {}
    for key in stats[0]:
        values = [s[key] for s in stats if key in s]
        out[key] = sum(values) if key in _SUMMED else sum(values) / len(values)
    if "bytes_sent" in out:
        out["peak_bytes"] = max(s.get("bytes_sent", 0.0) for s in stats)
    out["fragments"] = float(len(stats))
    return out
