"""The DiLoCo / SNOO wrapper: fast weights in the model, slow weights and outer state beside it.

Usage inside any training loop::

    dl = DiLoCo(model, inner_optimizer, outer="nesterov", sync_every=32,
                outer_lr=0.7, outer_momentum=0.9)     # the DiLoCo paper's η and μ
    loss.backward(); dl.step(); dl.zero_grad()    # outer step every sync_every-th call
    with dl.slow_weights(): evaluate(model)       # the model holds θ inside the block

A round (docs/design.md §1): the model's parameters are the fast weights φ. Every ``sync_every``
inner steps, the pseudo-gradient Δ = s − φ is formed *in the fast weights' own storage*,
averaged across worker groups by the reducer (no-op for one group: SNOO), handed to the outer
optimiser as the ``.grad`` of the slow weights θ, and the new start point s is written back into
the fast weights. Per round that is one elementwise pass to form Δ, the outer update, and one copy
into the fast weights; no parameter-sized temporary is allocated (with ``offload``, one host
staging copy, allocated at the first sync and reused).

All tensors are *local*: a plain parameter in one process, ``DTensor.to_local()`` (this rank's
FSDP2 shard) when sharded, so nothing is gathered. An engine that keeps its trainable weights
elsewhere (DeepSpeed ZeRO: flat fp32 partitions inside its optimizer) passes ``fast_tensors``, a
function returning them, and ``after_fast_write``, called whenever the wrapper has written them,
so the engine can refresh the model's weights from them (:mod:`diloco.job.engines.deepspeed`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from diloco.algorithm.arguments import PeakLR, check_arguments, check_holds_parameters
from diloco.algorithm.outer import EMANesterov, Nesterov, OuterOptimizer
from diloco.algorithm.reducer import PseudoGradientReducer, SingleGroup
from diloco.algorithm.tensors import check_shapes, local_tensor
from diloco.config import defaults
from diloco.errors import CheckpointError, DilocoError

__all__ = ["Checkpointable", "DiLoCo", "SyncReport", "NonFiniteError"]


class NonFiniteError(DilocoError):
    """Too many consecutive rounds had a non-finite pseudo-gradient."""


class Checkpointable(Protocol):
    """What a checkpointer (:class:`diloco.persist.checkpoint.Checkpointer`) asks of a wrapper
    besides its counters, tensors, outer optimiser and ``load_state_dict``. :class:`DiLoCo` and
    :class:`~diloco.algorithm.streaming.StreamingDiLoCo` implement it."""

    #: Whether a checkpoint must hold the fast weights: at a round boundary they differ from
    #: the start point s that ``load_state_dict`` rebuilds (Streaming DiLoCo), so they are saved.
    checkpoint_fast_weights: bool

    def checkpoint_blocker(self) -> str | None:
        """Why the state cannot be saved now (e.g. an average in flight), or None."""
        ...

    def inner_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimisers whose state is the inner state (as DCP's
        ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` take them)."""
        ...


@dataclass
class SyncReport:
    """What one outer step did (one per round, logged by the training job)."""

    round: int
    inner_steps: int
    pseudo_grad_norm: float
    skipped: bool
    beta: float
    delta_s: float  # forming Δ in place
    reduce_s: float  # averaging Δ across groups
    outer_s: float  # outer update + writing the start point
    reducer: dict[str, float] = field(default_factory=dict)


class DiLoCo:
    """Two-loop optimiser: inner steps on the model, an outer step every ``sync_every`` steps.

    Args:
        model: the module whose parameters are the fast weights (plain or FSDP2-sharded).
        inner_optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters (or an
            object with the same ``step``, ``zero_grad``, ``param_groups``, ``state_dict`` and
            ``load_state_dict``, such as an engine's adapter).
        outer: ``"nesterov"`` (DiLoCo/SNOO), ``"sgd"`` (Lookahead, μ = 0), ``"ema_nesterov"`` or
            ``"none"`` (plain inner optimiser: ``step`` is ``inner_optimizer.step``).
        sync_every: K, inner steps per round.
        outer_lr: η.
        outer_momentum: μ for ``nesterov``.
        ema_beta, ema_gamma, ema_init: β_max, γ and m's initialisation for ``ema_nesterov``.
        ema_warmup_steps, ema_rest_steps: β = 0 while fewer than ``ema_warmup_steps`` inner
            steps are done, and from ``total_steps - ema_rest_steps`` on.
        total_steps: planned inner steps (needed for ``ema_rest_steps``).
        reducer: averages Δ across worker groups (default: one group, nothing sent).
        offload: ``"cpu"`` keeps θ and the outer state in host memory (pinned with CUDA).
        max_bad_rounds: consecutive non-finite rounds tolerated before :class:`NonFiniteError`.
        fast_tensors: returns this rank's fast weights φ, the tensors the inner optimiser
            updates (default: the local storage of ``model``'s trainable parameters). θ and the
            outer state are shaped like them.
        after_fast_write: called after the wrapper wrote into the fast weights (the restart
            at a sync, entering and leaving :meth:`slow_weights`, :meth:`load_state_dict`), for
            an engine whose model weights are a copy of them (default: nothing to do).

    The defaults come from :mod:`diloco.config.defaults` (``diloco train``'s: K = 16, η = 0.7,
    μ = 0.5, β_max = 0.7, γ = 0.99); the DiLoCo paper's pair is η = 0.7, μ = 0.9, and
    EMA-Nesterov's paper form η = 1 (docs/config.md, "Choosing K, η, μ, β, γ").

    β of the next start point is β_max · lr / lr_peak (never above β_max), read from the inner
    optimiser's first param group at the outer step (the LR of the step that closed the round);
    lr_peak is the schedule's peak (:class:`~diloco.algorithm.arguments.PeakLR`). Misuse raises
    (:mod:`~diloco.algorithm.arguments`; a step inside ``with dl.slow_weights():``).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        outer: str = defaults.OUTER_METHOD,
        sync_every: int = defaults.SYNC_EVERY,
        outer_lr: float = defaults.OUTER_LR,
        outer_momentum: float = defaults.OUTER_MOMENTUM,
        ema_beta: float = defaults.EMA_BETA,
        ema_gamma: float = defaults.EMA_GAMMA,
        ema_init: str = defaults.EMA_INIT,
        ema_warmup_steps: int = 0,
        ema_rest_steps: int = 0,
        total_steps: int | None = None,
        reducer: PseudoGradientReducer | None = None,
        offload: str = defaults.OFFLOAD,
        max_bad_rounds: int = defaults.MAX_BAD_ROUNDS,
        fast_tensors: Callable[[], list[Tensor]] | None = None,
        after_fast_write: Callable[[], None] | None = None,
    ):
        check_arguments(
            outer, sync_every, ema_beta, ema_warmup_steps, ema_rest_steps, total_steps, offload,
            max_bad_rounds,
        )  # fmt: skip
        if fast_tensors is None:
            check_holds_parameters(model, inner_optimizer)
        self.model = model
        self.inner = inner_optimizer
        self.method = outer
        self.sync_every = sync_every
        self.reducer = reducer if reducer is not None else SingleGroup()
        self.ema_beta = ema_beta
        self.ema_warmup_steps = ema_warmup_steps
        self.ema_rest_steps = ema_rest_steps
        self.total_steps = total_steps
        self.max_bad_rounds = max_bad_rounds
        self.inner_steps = 0
        self.steps_in_round = 0
        self.bad_rounds = 0
        self._rounds = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._cuda = any(p.is_cuda for p in self.params)
        self._fast_provider = fast_tensors
        self._after_fast_write = after_fast_write if after_fast_write is not None else _nothing
        self._peak_lr = PeakLR(inner_optimizer.param_groups[0])
        self._holding_slow = False  # inside ``with slow_weights():``
        self.outer: OuterOptimizer | None = None
        self.offload = offload  # "cpu": sync() works on a host staging copy of φ
        self._pin = offload == "cpu" and torch.cuda.is_available()
        self._staging: list[Tensor] | None = None
        if outer == "none":
            return
        host = offload == "cpu"
        sources = self.params if fast_tensors is None else fast_tensors()
        slow = [self._clone_local(p, "cpu" if host else None, self._pin) for p in sources]
        if outer == "ema_nesterov":
            self.outer = EMANesterov(slow, lr=outer_lr, gamma=ema_gamma, ema_init=ema_init)
        else:
            momentum = outer_momentum if outer == "nesterov" else 0.0
            self.outer = Nesterov(slow, lr=outer_lr, momentum=momentum)

    @staticmethod
    def _clone_local(p: Tensor, device: str | None, pin: bool) -> Tensor:
        t = local_tensor(p)
        out = torch.empty(t.shape, dtype=t.dtype, device=device or t.device, pin_memory=pin)
        return out.copy_(t)

    # ------------------------------------------------------------------ views
    def _reshard(self) -> None:
        """FSDP2 can leave root parameters unsharded after a no-grad forward; re-shard them."""
        reshard = getattr(self.model, "reshard", None)
        if callable(reshard):
            reshard()

    def fast_tensors(self) -> list[Tensor]:
        """This rank's fast weights φ (views of the model's parameter storage, or what the
        ``fast_tensors`` function given to the constructor returns)."""
        if self._fast_provider is not None:
            return list(self._fast_provider())
        self._reshard()
        return [local_tensor(p) for p in self.params]

    def slow_tensors(self) -> list[Tensor]:
        """This rank's slow weights θ (empty for ``outer="none"``)."""
        return self.outer.slow_tensors() if self.outer is not None else []

    @property
    def outer_steps(self) -> int:
        """Completed rounds, skipped (non-finite) rounds included."""
        return self._rounds

    # ------------------------------------------------------------------ stepping
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> SyncReport | None:
        """One inner step; at the end of a round also the outer step (returns its report)."""
        self._inner_step(closure)
        if self.outer is None:
            return None
        self.steps_in_round += 1
        if self.steps_in_round == self.sync_every:
            return self.sync()
        return None

    def _inner_step(self, closure: Any) -> None:
        """The inner optimiser's step (a closure's loss is not kept), counted."""
        self._check_not_holding_slow("step()")
        self._peak_lr.observe(self.inner.param_groups[0])
        if closure is not None:
            self.inner.step(closure)
        else:
            self.inner.step()
        self.inner_steps += 1

    def _next_beta(self) -> float:
        n = self.inner_steps
        if n < self.ema_warmup_steps:
            return 0.0
        if self.total_steps is not None and n >= self.total_steps - self.ema_rest_steps:
            return 0.0
        return self.ema_beta * self._peak_lr.ratio(self.inner.param_groups[0])

    def _check_not_holding_slow(self, what: str) -> None:
        """Raise inside ``with slow_weights():``, whose exit would overwrite what ``what`` wrote."""
        if self._holding_slow:
            raise RuntimeError(
                f"DiLoCo.{what} inside 'with dl.slow_weights():' would be lost when the block "
                "restores the fast weights; call it after the block"
            )

    @torch.no_grad()
    def sync(self) -> SyncReport | None:
        """Close the round now: average Δ, take the outer step, restart the fast weights.

        Called by :meth:`step` every ``sync_every`` steps; call it yourself to end training on
        a partial round. A no-op (returns None) when no inner step was taken since the last sync.
        """
        self._check_not_holding_slow("sync()")
        if self.outer is None or self.steps_in_round == 0:
            return None
        t0 = self._now()
        fast = self.fast_tensors()
        slow = self.slow_tensors()
        work = fast if self.offload == "none" else self._staging_copy()
        if work is not fast:
            torch._foreach_copy_(work, fast)
        # Δ = s − φ in place: work ← θ − φ (+ β·m for EMA-Nesterov).
        torch._foreach_mul_(work, -1.0)
        torch._foreach_add_(work, slow)
        self.outer.add_lookahead(work)
        t1 = self._now()
        reducer_stats = self._average(work, fast)
        t2 = self._now()
        norm = self._global_norm(work)
        skipped = not math.isfinite(norm)
        if not skipped:
            for p, d in zip(slow, work, strict=True):
                p.grad = d
            self.outer.step()
            for p in slow:
                p.grad = None
            if isinstance(self.outer, EMANesterov):
                self.outer.set_beta(self._next_beta())
        self.outer.write_start(work)  # skipped: the unchanged start point of this round
        if work is not fast:
            torch._foreach_copy_(fast, work, non_blocking=True)
        self._after_fast_write()
        t3 = self._now()
        return self._close_round(norm, skipped, t1 - t0, t2 - t1, t3 - t2, reducer_stats)

    def _now(self) -> float:
        """``perf_counter()`` once the device has run everything queued (CUDA runs kernels
        asynchronously): a round's times then hold its own kernels, not the inner steps'."""
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _staging_copy(self) -> list[Tensor]:
        """Host buffers like θ (pinned with CUDA) for Δ and s when offloaded; made once."""
        if self._staging is None:
            self._staging = [torch.empty_like(t, pin_memory=self._pin) for t in self.slow_tensors()]
        return self._staging

    def _close_round(
        self,
        norm: float,
        skipped: bool,
        delta_s: float,
        reduce_s: float,
        outer_s: float,
        reducer_stats: dict[str, float],
    ) -> SyncReport:
        """Count the round that just ended and report it.

        Raises:
            NonFiniteError: this was the ``max_bad_rounds``-th skipped round in a row.
        """
        self._rounds += 1
        self.steps_in_round = 0
        self.bad_rounds = self.bad_rounds + 1 if skipped else 0
        report = SyncReport(
            round=self._rounds,
            inner_steps=self.inner_steps,
            pseudo_grad_norm=norm,
            skipped=skipped,
            beta=self.outer.beta if isinstance(self.outer, EMANesterov) else 0.0,
            delta_s=delta_s,
            reduce_s=reduce_s,
            outer_s=outer_s,
            reducer=reducer_stats,
        )
        if skipped and self.bad_rounds >= self.max_bad_rounds:
            raise NonFiniteError(
                f"pseudo-gradient was non-finite for {self.bad_rounds} rounds in a row "
                f"(last: round {self._rounds}); lower inner.lr or raise train.max_bad_rounds"
            )
        return report

    def _average(self, work: list[Tensor], fast: list[Tensor]) -> dict[str, float]:
        """Average Δ across groups; with offload the collective runs on the device copy."""
        if self.reducer.groups == 1:
            return self.reducer.average(work)
        if work is fast:
            return self.reducer.average(fast)
        torch._foreach_copy_(fast, work)
        stats = self.reducer.average(fast)
        torch._foreach_copy_(work, fast)
        return stats

    def _global_norm(self, tensors: list[Tensor]) -> float:
        """‖Δ‖ over the whole model: local squared norms summed over this group's shards."""
        if not tensors:
            return 0.0
        sq = torch.stack(torch._foreach_norm(tensors)).double().square().sum()
        return float(self.reducer.sum_over_shards(sq).sqrt())

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[nn.Module]:
        """Within the block the model holds θ; the fast weights come back afterwards.

        Costs nothing when the fast weights already equal θ (right after a sync with no
        lookahead); otherwise one backup copy of the fast weights.
        """
        self._check_not_holding_slow("slow_weights()")
        self._holding_slow = True
        try:
            if self.outer is None or self._fast_equals_slow():
                yield self.model
                return
            with torch.no_grad():
                backup = [t.clone() for t in self.fast_tensors()]
                torch._foreach_copy_(self.fast_tensors(), self.slow_tensors())
                self._after_fast_write()
            try:
                yield self.model
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(self.fast_tensors(), backup)
                    self._after_fast_write()
        finally:
            self._holding_slow = False

    def _fast_equals_slow(self) -> bool:
        at_start = self.steps_in_round == 0
        lookahead = isinstance(self.outer, EMANesterov) and self.outer.beta != 0.0
        return at_start and not lookahead

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Slow weights, outer and inner state, counters; the fast weights only mid-round."""
        sd: dict[str, Any] = {
            "method": self.method,
            "inner": self.inner.state_dict(),
            "inner_steps": self.inner_steps,
            "steps_in_round": self.steps_in_round,
            "rounds": self._rounds,
            "bad_rounds": self.bad_rounds,
            "lr_peak": self._peak_lr.peak,
        }
        if self.outer is not None:
            sd["slow"] = [t.detach().clone() for t in self.slow_tensors()]
            sd["outer"] = self.outer.state_dict()
            if self.steps_in_round:
                sd["fast"] = [t.clone() for t in self.fast_tensors()]
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the fast weights are restored too (or rebuilt as s)."""
        self._check_not_holding_slow("load_state_dict()")
        self._check_state(sd)  # everything before changing anything
        self.inner.load_state_dict(sd["inner"])
        self.inner_steps = sd["inner_steps"]
        self.steps_in_round = sd["steps_in_round"]
        self._rounds = sd["rounds"]
        self.bad_rounds = sd["bad_rounds"]
        self._peak_lr.peak = max(self._peak_lr.peak, sd.get("lr_peak", 0.0))
        if self.outer is None:
            return
        torch._foreach_copy_(self.slow_tensors(), sd["slow"])
        self.outer.load_state_dict(sd["outer"])
        fast = self.fast_tensors()
        if "fast" in sd:  # saved mid-round (else the fast weights restart at s)
            torch._foreach_copy_(fast, sd["fast"])
        else:
            self._restart_all(fast)
        self._after_fast_write()

    def _check_state(self, sd: dict[str, Any]) -> None:
        """Raise CheckpointError unless ``sd`` fits this wrapper (method and shapes)."""
        if sd.get("method") != self.method:
            raise CheckpointError(
                f"state is for outer method {sd.get('method')!r}, this run uses {self.method!r}"
            )
        if self.outer is not None:
            check_shapes("slow weights", sd["slow"], self.slow_tensors())
            if "fast" in sd:
                check_shapes("fast weights", sd["fast"], self.fast_tensors())

    def _restart_all(self, fast: list[Tensor]) -> None:
        """fast ← s, the start point of the next round (through the staging copy if offloaded)."""
        if self.offload == "none":
            self.outer.write_start(fast)
        else:
            staging = self._staging_copy()
            self.outer.write_start(staging)
            torch._foreach_copy_(fast, staging, non_blocking=True)

    # ------------------------------------------------------------------ shared state
    def shared_tensors(self) -> list[Tensor]:
        """What every group holds identically at a round boundary: θ, then the outer state
        buffers (this rank's shards). A joining group receives them (elastic healing)."""
        if self.outer is None:
            return []
        return [*self.slow_tensors(), *self.outer.buffers()]

    def shared_state(self) -> dict[str, Any]:
        """The counters and schedule values that go with :meth:`shared_tensors` (JSON)."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.outer.param_groups]
        return {
            "inner_steps": self.inner_steps,
            "rounds": self._rounds,
            "bad_rounds": self.bad_rounds,
            "outer_groups": groups,
            "inner_lrs": [g["lr"] for g in self.inner.param_groups],
        }

    def load_shared_state(self, state: dict[str, Any]) -> None:
        """Adopt another group's :meth:`shared_state` (its tensors are already copied in)."""
        self.inner_steps = state["inner_steps"]
        self._rounds = state["rounds"]
        self.bad_rounds = state["bad_rounds"]
        for g, saved in zip(self.outer.param_groups, state["outer_groups"], strict=True):
            g.update(saved)
        for g, lr in zip(self.inner.param_groups, state["inner_lrs"], strict=True):
            g["lr"] = lr

    # ------------------------------------------------------------------ checkpoints
    #: The fast weights equal the start point at a round boundary: checkpoints leave them out.
    checkpoint_fast_weights = False

    def checkpoint_blocker(self) -> str | None:
        """Nothing keeps DiLoCo from being saved at a round boundary."""
        return None

    def inner_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimisers holding the inner state: the inner optimiser itself, or the parts
        of a composite one (an inner optimiser with a ``parts`` tuple, such as
        :class:`diloco.job.inner.MuonWithAdamW`)."""
        return list(getattr(self.inner, "parts", None) or [self.inner])


def _nothing() -> None:
    """The default ``after_fast_write``: the fast weights are the model's own storage."""
