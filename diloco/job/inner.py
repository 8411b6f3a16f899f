"""Inner optimisers (AdamW, SGD, Muon+AdamW) and their learning-rate schedules.

The inner optimiser trains the fast weights of one group. Its state is kept across rounds and
never communicated (docs/design.md §1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "build_inner_optimizer",
    "build_scheduler",
    "clip_gradients",
    "lr_multiplier",
    "MuonWithAdamW",
    "scalar",
]


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` for the 2-D hidden weight matrices, AdamW for everything else.

    Embeddings (and the tied output head) and all 1-D tensors go to AdamW, as in modded-nanogpt.
    The two optimisers' param groups are exposed as one list, so LR schedulers and β ratios see
    them as one optimiser; ``state_dict`` holds both; ``parts`` lists them (what a checkpoint
    saves: :meth:`diloco.DiLoCo.inner_optimizers`).
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        self.parts = (muon, adamw)
        # Deliberately no super().__init__: the parts own the params, groups and state.
        self.param_groups = muon.param_groups + adamw.param_groups
        self.defaults = {}
        self.state = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # load_state_dict replaces the parts' group dicts: re-expose the new ones.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def _is_matrix_weight(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and "wte" not in name and "wpe" not in name and "lm_head" not in name


def build_inner_optimizer(
    model: nn.Module,
    optimizer: str = "adamw",
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    betas: Iterable[float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    muon_lr: float = 0.02,
) -> torch.optim.Optimizer:
    """The inner optimiser over ``model``'s trainable parameters.

    Weight decay applies to tensors with ≥ 2 dims only (not to norms and biases).
    ``muon``: Muon(lr=``muon_lr``) on 2-D hidden weights, AdamW(lr=``lr``) on the rest.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = tuple(betas)
    if optimizer == "muon":
        matrices = [p for n, p in named if _is_matrix_weight(n, p)]
        rest = [(n, p) for n, p in named if not _is_matrix_weight(n, p)]
        muon = torch.optim.Muon(
            matrices, lr=muon_lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov
        )
        return MuonWithAdamW(muon, _adamw(rest, lr, weight_decay, betas, eps))
    if optimizer == "adamw":
        return _adamw(named, lr, weight_decay, betas, eps)
    if optimizer == "sgd":
        return torch.optim.SGD(
            _decay_groups(named, weight_decay),
            lr=lr,
            momentum=momentum,
            nesterov=nesterov and momentum > 0,
        )
    raise ValueError(f"inner optimizer must be adamw, sgd or muon; got {optimizer!r}")


def _decay_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _adamw(named, lr, weight_decay, betas, eps) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for every tensor's update) when the parameters are on CUDA,
    else the multi-tensor (foreach) implementation."""
    cuda = bool(named) and all(p.is_cuda for _, p in named)
    impl = {"fused": True} if cuda else {"foreach": True}
    return torch.optim.AdamW(
        _decay_groups(named, weight_decay), lr=lr, betas=betas, eps=eps, **impl
    )


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_frac: float = 0.2,
) -> float:
    """LR / peak LR for 0-based inner step ``step``.

    Linear warm-up from 1/warmup to 1 over ``warmup_steps``; then
    ``constant``: 1; ``cosine``: min + (1 − min)·(1 + cos(π·p))/2 with p the fraction of the
    post-warm-up steps done; ``wsd`` (warm-up, stable, decay): 1 until the last ``decay_frac``
    of all steps, then linear down to ``min_lr_ratio`` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = int(round(decay_frac * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return 1.0
        progress = (step - decay_start + 1) / decay_steps
        return 1.0 - (1.0 - min_lr_ratio) * progress
    raise ValueError(f"schedule must be constant, cosine or wsd; got {schedule!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, **schedule: Any
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier`; call ``.step()`` after each inner step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, **schedule)
    )


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor | None:
    """Scale the gradients by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the global norm over the
    whole model and every shard of the group (``torch.nn.utils.clip_grad_norm_``; FSDP2's
    DTensor gradients sum their shards' squares). Returns ‖g‖ before clipping (a DTensor when
    sharded: read it with :func:`scalar` on every rank at the same step), None if
    ``max_norm`` is 0 (no clipping)."""
    if not max_norm:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def scalar(t: Tensor) -> float:
    """A scalar tensor's value; a sharded DTensor's full value (a collective)."""
    full_tensor = getattr(t, "full_tensor", None)
    return float(full_tensor() if full_tensor is not None else t)
