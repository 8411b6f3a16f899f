"""Outer optimisers: the update of the slow weights θ from the pseudo-gradient Δ.

Each outer optimiser is a :class:`torch.optim.Optimizer` over the slow weights. The pseudo-
gradient of a round, Δ_t = mean_g (s_t − φ_g), is passed in as the ``.grad`` of each slow tensor,
so the outer step reads like any optimiser step. Tensors are whatever this rank holds: full
parameters in a single process, the local FSDP2 shards (``DTensor.to_local()``) when sharded.
Every update is elementwise and runs as one ``torch._foreach_*`` pass per operation over all
tensors.

Besides ``step()``, an outer optimiser knows the *start point* s of the next round (the point
every group's fast weights restart from) and writes it with :meth:`OuterOptimizer.write_start`.

Streaming DiLoCo (:mod:`diloco.algorithm.streaming`) gives the optimiser one param group per
fragment and passes ``group=i`` to ``step``/``write_start``/``add_lookahead``/``set_beta`` to
touch only fragment i; ``group=None`` (the default) means every group, as before.

Maths (docs/design.md §1; η = ``lr``, μ = ``momentum``):

* :class:`Nesterov` — b ← μ·b + Δ;  θ ← θ − η·(Δ + μ·b);  s = θ.  This is exactly (bit for
  bit: the same ops in the same order) ``torch.optim.SGD(lr=η, momentum=μ, nesterov=True,
  dampening=0)`` fed Δ as the gradient.
  With μ = 0 it is plain SGD on Δ: Lookahead (η < 1), local SGD / FedAvg (η = 1).
* :class:`EMANesterov` — θ_{t+1} = s_t − η·Δ_t;  m ← γ·m + (1 − γ)·(θ_{t+1} − θ_t);
  s_{t+1} = θ_{t+1} + β_{t+1}·m.  Since s_t = θ_t + β_t·m_t, the increment is
  θ_{t+1} − θ_t = β_t·m_t − η·Δ_t, so only θ and m are stored.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from diloco.config.defaults import (
    EMA_GAMMA,
    EMA_INIT,
    EMA_INITS,
    OUTER_LR,
    OUTER_METHODS,
    OUTER_MOMENTUM,
)

__all__ = ["OuterOptimizer", "Nesterov", "EMANesterov", "OUTER_METHODS"]


class OuterOptimizer(torch.optim.Optimizer):
    """Base class: an optimiser over slow weights that also writes the next start point.

    A subclass names its constructor's settings in :attr:`settings` (kept in ``defaults``, so
    :meth:`regrouped` can rebuild it) and its per-tensor state in :meth:`buffer_names`.
    """

    #: The constructor's keyword arguments besides ``params``, as stored in ``defaults``.
    settings: tuple[str, ...] = ()

    def regrouped(self, groups: list[list[Tensor]]) -> OuterOptimizer:
        """The same optimiser (same settings, no state yet) with one param group per entry of
        ``groups`` (Streaming DiLoCo: one per fragment)."""
        settings = {k: self.defaults[k] for k in self.settings}
        return type(self)([{"params": g} for g in groups], **settings)

    def buffer_names(self) -> tuple[str, ...]:
        """The names of the state buffers kept per slow tensor (each shaped like it)."""
        return ()

    def buffers(self) -> list[Tensor]:
        """Every state buffer (:meth:`buffer_names`, then slow-tensor order), allocated as zeros
        where the optimiser has not made it yet (a zero buffer is what a missing one means)."""
        out = []
        for name in self.buffer_names():
            for p in self.slow_tensors():
                state = self.state[p]
                if name not in state:
                    state[name] = torch.zeros_like(p)
                out.append(state[name])
        return out

    def slow_tensors(self, group: int | None = None) -> list[Tensor]:
        """The slow tensors θ of param group ``group`` (None: all, in param-group order)."""
        return [p for g in self._groups(group) for p in g["params"]]

    def _groups(self, group: int | None) -> list[dict]:
        return self.param_groups if group is None else [self.param_groups[group]]

    @torch.no_grad()
    def write_start(self, fast: list[Tensor], group: int | None = None) -> None:
        """fast ← s, the start point of the next round (of param group ``group`` only)."""
        torch._foreach_copy_(fast, self.slow_tensors(group))
        self.add_lookahead(fast, group=group)

    @torch.no_grad()
    def add_lookahead(
        self, tensors: list[Tensor], sign: float = 1.0, group: int | None = None
    ) -> None:
        """tensors += sign·(s − θ); s = θ here, so nothing to add."""

    @torch.no_grad()
    def step(self, closure=None, group: int | None = None):  # noqa: D102 - maths: class doc
        if closure is not None:
            raise ValueError("outer optimisers take no closure")
        for g in self._groups(group):
            grads = [p.grad for p in g["params"]]
            if any(d is None for d in grads):
                raise RuntimeError(
                    "outer step needs the pseudo-gradient in .grad of every slow tensor"
                )
            self._update(g, g["params"], grads)

    def _update(self, group: dict, slow: list[Tensor], grads: list[Tensor]) -> None:
        """One outer step of a param group: θ (``slow``) from Δ (``grads``, may be overwritten)."""
        raise NotImplementedError


class Nesterov(OuterOptimizer):
    """Nesterov momentum on the pseudo-gradient (DiLoCo, SNOO); ``momentum=0`` is Lookahead/SGD.

    b ← μ·b + Δ;  θ ← θ − η·(Δ + μ·b).  The buffer b has the shape (and sharding) of θ and is
    only allocated when μ > 0.
    """

    settings = ("lr", "momentum")

    def __init__(
        self, params: Iterable[Tensor], lr: float = OUTER_LR, momentum: float = OUTER_MOMENTUM
    ):
        if lr <= 0:
            raise ValueError(f"outer lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum))

    def _update(self, group: dict, slow: list[Tensor], grads: list[Tensor]) -> None:
        """The ops (and so the roundings) of ``torch.optim.SGD(nesterov=True)``: b ← μ·b + Δ;
        the step d = Δ + μ·b is formed in the gradient buffer (scratch after this step), then
        θ ← θ − η·d in one add: θ is rounded once per round, so the two agree bit for bit."""
        lr, mu = group["lr"], group["momentum"]
        if mu > 0:
            bufs = [self._momentum_buffer(p) for p in slow]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(grads, bufs, alpha=mu)
        torch._foreach_add_(slow, grads, alpha=-lr)

    def buffer_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.param_groups[0]["momentum"] > 0 else ()

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]


class EMANesterov(OuterOptimizer):
    """Lookahead along an exponential moving average m of past outer increments.

    θ ← θ + u with u = β_t·m − η·Δ  (i.e. θ_{t+1} = s_t − η·Δ_t);
    m ← γ·m + (1 − γ)·u, or m ← u on the first round when ``ema_init="first_increment"``;
    next start point s = θ + β·m with β set by :meth:`set_beta` before :meth:`write_start`.

    ``beta`` is the β_t currently baked into the start point; m is updated every round whatever
    β is. State per slow tensor: ``ema`` (m, shaped like θ). Group state: ``beta`` and
    ``rounds`` (outer steps taken), both saved in ``state_dict``.
    """

    settings = ("lr", "gamma", "ema_init")

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = OUTER_LR,
        gamma: float = EMA_GAMMA,
        ema_init: str = EMA_INIT,
    ):
        if lr <= 0:
            raise ValueError(f"outer lr must be > 0, got {lr}")
        if not 0 <= gamma < 1:
            raise ValueError(f"ema gamma must be in [0, 1), got {gamma}")
        if ema_init not in EMA_INITS:
            raise ValueError(f"ema_init must be 'zero' or 'first_increment', got {ema_init!r}")
        super().__init__(params, dict(lr=lr, gamma=gamma, ema_init=ema_init, beta=0.0, rounds=0))

    def buffer_names(self) -> tuple[str, ...]:
        return ("ema",)

    def _emas(self, group: dict) -> list[Tensor]:
        emas = []
        for p in group["params"]:
            state = self.state[p]
            if "ema" not in state:
                state["ema"] = torch.zeros_like(p)
            emas.append(state["ema"])
        return emas

    def _update(self, group: dict, slow: list[Tensor], grads: list[Tensor]) -> None:
        emas = self._emas(group)
        # u = β_t·m − η·Δ, built in the gradient buffers (they are scratch after this step).
        increments = grads
        torch._foreach_mul_(increments, -group["lr"])
        if group["beta"] != 0.0:
            torch._foreach_add_(increments, emas, alpha=group["beta"])
        torch._foreach_add_(slow, increments)
        if group["rounds"] == 0 and group["ema_init"] == "first_increment":
            torch._foreach_copy_(emas, increments)
        else:
            torch._foreach_lerp_(emas, increments, 1.0 - group["gamma"])
        group["rounds"] += 1

    def set_beta(self, beta: float, group: int | None = None) -> None:
        """Set β_{t+1}, the lookahead coefficient of the next start point (of ``group``)."""
        for g in self._groups(group):
            g["beta"] = float(beta)

    @property
    def beta(self) -> float:
        return self.param_groups[0]["beta"]

    @torch.no_grad()
    def add_lookahead(
        self, tensors: list[Tensor], sign: float = 1.0, group: int | None = None
    ) -> None:
        """tensors += sign·β·m (used to form s − φ without materialising s).

        ``tensors`` line up with :meth:`slow_tensors` (``group``); each param group adds its
        own β (they differ only when fragments set β at different times).
        """
        groups = self._groups(group)
        if len(groups) == 1:  # the common case: one call over every tensor
            beta = groups[0]["beta"]
            if beta != 0.0:
                torch._foreach_add_(tensors, self._emas(groups[0]), alpha=sign * beta)
            return
        start = 0
        for g in groups:
            n = len(g["params"])
            if g["beta"] != 0.0:
                torch._foreach_add_(
                    tensors[start : start + n], self._emas(g), alpha=sign * g["beta"]
                )
            start += n
