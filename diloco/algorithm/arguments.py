"""Checking what :class:`diloco.DiLoCo` is given, as torch optimisers check theirs, and the peak
inner LR that scales EMA-Nesterov's β.

Each check raises ``ValueError`` (a value that cannot work) or ``TypeError`` (a value of the
wrong kind) with one line naming the argument, what it got and what is allowed.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from diloco.algorithm.outer import OUTER_METHODS
from diloco.config import defaults

__all__ = ["PeakLR", "check_arguments", "check_holds_parameters"]


def _integer(name: str, value: Any, low: int) -> None:
    """``value`` must be an int (not a bool, not a float such as 2.5) and >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_arguments(
    outer: str,
    sync_every: Any,
    ema_beta: float,
    ema_warmup_steps: Any,
    ema_rest_steps: Any,
    total_steps: Any,
    offload: str,
    max_bad_rounds: Any,
) -> None:
    """Raise for an argument of :class:`~diloco.algorithm.wrapper.DiLoCo` that cannot work (the
    outer optimisers check ``outer_lr``, ``outer_momentum``, ``ema_gamma``, ``ema_init``)."""
    if outer not in OUTER_METHODS:
        raise ValueError(f"outer must be nesterov, sgd, ema_nesterov or none; got {outer!r}")
    _integer("sync_every", sync_every, 1)
    if not 0 <= ema_beta < 1:
        raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")
    if offload not in defaults.OFFLOADS:
        raise ValueError(f"offload must be 'none' or 'cpu', got {offload!r}")
    _integer("ema_warmup_steps", ema_warmup_steps, 0)
    _integer("ema_rest_steps", ema_rest_steps, 0)
    _integer("max_bad_rounds", max_bad_rounds, 1)
    if total_steps is not None:
        _integer("total_steps", total_steps, 1)
    elif ema_rest_steps:
        raise ValueError("ema_rest_steps needs total_steps")


def check_holds_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise unless ``optimizer`` updates every trainable parameter of ``model``: a parameter it
    does not hold would never move, and a round would average nothing (Δ = 0)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if id(p) not in held]
    if missing:
        raise ValueError(
            f"inner_optimizer does not hold {len(missing)} of the model's {len(trainable)} "
            f"trainable parameters (e.g. {missing[0]!r}); build it from model.parameters() "
            "of this model, or set requires_grad=False on the parameters to freeze"
        )


class PeakLR:
    """lr_peak of β_t = β_max · lr_t / lr_peak (capped at β_max).

    The peak is the schedule's own when it names one (``OneCycleLR``'s ``max_lr``), else the
    running maximum of ``initial_lr`` (the LR before any schedule) and every LR seen; an LR
    that is still 0 gives β = 0.
    """

    def __init__(self, group: dict[str, Any]):
        self.peak = max(
            float(group.get("max_lr", 0.0)), float(group.get("initial_lr", 0.0)), _lr(group)
        )

    def observe(self, group: dict[str, Any]) -> None:
        """Count the LR that ``group`` holds now (call it before each inner step)."""
        self.peak = max(self.peak, _lr(group))

    def ratio(self, group: dict[str, Any]) -> float:
        """lr_t / lr_peak in [0, 1]."""
        return min(1.0, _lr(group) / self.peak) if self.peak > 0 else 0.0


def _lr(group: dict[str, Any]) -> float:
    return float(group["lr"])
