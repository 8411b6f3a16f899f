"""The outer loop's choices and defaults, defined once for the library and the config.

:class:`diloco.DiLoCo` (its keyword defaults), the outer optimisers of
:mod:`diloco.algorithm.outer` and the ``outer``/``train`` sections of :mod:`diloco.config.schema`
all read these names, so ``DiLoCo(model, opt)`` and ``diloco train`` with no settings take the
same outer step. The values are the tiny CPU SNOO run's (``configs/tiny_snoo.yaml``);
docs/config.md's "Choosing K, η, μ, β, γ" says where to start for other runs. Torch-free.
"""

from __future__ import annotations

__all__ = [
    "COMPRESS_METHODS",
    "EMA_BETA",
    "EMA_GAMMA",
    "EMA_INIT",
    "EMA_INITS",
    "MAX_BAD_ROUNDS",
    "OFFLOAD",
    "OFFLOADS",
    "OUTER_LR",
    "OUTER_METHOD",
    "OUTER_METHODS",
    "OUTER_MOMENTUM",
    "SYNC_EVERY",
]

#: Outer methods: DiLoCo/SNOO, Lookahead / local SGD, EMA-Nesterov, no outer step.
OUTER_METHODS: tuple[str, ...] = ("nesterov", "sgd", "ema_nesterov", "none")
#: How the pseudo-gradient travels between groups (``outer.compress``).
COMPRESS_METHODS: tuple[str, ...] = ("none", "bf16", "int8")
#: Where θ and the outer state live (``outer.offload``).
OFFLOADS: tuple[str, ...] = ("none", "cpu")
#: How the EMA-Nesterov momentum starts (``outer.ema_init``).
EMA_INITS: tuple[str, ...] = ("zero", "first_increment")

#: The outer method (``outer.method``, ``DiLoCo(outer=)``): DiLoCo, SNOO with one group.
OUTER_METHOD = "nesterov"
#: K: inner steps per round (``outer.sync_every``, ``DiLoCo(sync_every=)``).
SYNC_EVERY = 16
#: η: outer learning rate, every method (``outer.lr``, ``DiLoCo(outer_lr=)``).
OUTER_LR = 0.7
#: μ: outer Nesterov momentum (``outer.momentum``, ``DiLoCo(outer_momentum=)``).
OUTER_MOMENTUM = 0.5
#: β_max: EMA-Nesterov peak lookahead (``outer.ema_beta``).
EMA_BETA = 0.7
#: γ: EMA-Nesterov momentum decay (``outer.ema_gamma``).
EMA_GAMMA = 0.99
#: m's initialisation (``outer.ema_init``).
EMA_INIT = "zero"
#: ``outer.offload``: θ and the outer state on the parameters' device.
OFFLOAD = "none"
#: Consecutive non-finite rounds tolerated (``train.max_bad_rounds``).
MAX_BAD_ROUNDS = 3
