"""What one benchmark run is: :class:`RunSpec` (its identity and full config), its cache key
(:func:`run_key`) and the label of its tuned settings (:func:`settings_label`).

Shared by :mod:`diloco.bench.plan` (which makes the specs), :mod:`diloco.bench.runner` (which
runs and caches them) and :mod:`diloco.bench.report` (which shows them); it imports none of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from diloco.config import config_from_dict, config_to_dict

__all__ = ["RunSpec", "run_key", "settings_label"]


@dataclass(frozen=True)
class RunSpec:
    """One training of the benchmark: what it is (for the tables) and its full config."""

    method: str
    size: str
    steps: int
    seed: int
    settings: dict[str, Any]  # the tuned knobs that distinguish it from its method's defaults
    cfg: dict[str, dict[str, Any]]  # nested config (``run.out_dir`` is set by the runner)
    groups: int = 1
    tuning: bool = False  # tuning runs are scheduled before measurement runs

    @property
    def key(self) -> str:
        return run_key(self.method, self.size, self.steps, self.seed, self.groups, self.cfg)

    def cost(self) -> float:
        """≈ training FLOPs / 6: parameters × tokens (orders the queue, longest first)."""
        model, data = self.cfg["model"], self.cfg["data"]
        params = (
            12 * model["n_layer"] * model["n_embd"] ** 2 + model["vocab_size"] * model["n_embd"]
        )
        return params * self.steps * data["batch_size"] * model["block_size"] * self.groups


def run_key(method: str, size: str, steps: int, seed: int, groups: int, cfg: dict) -> str:
    """``<method>-<size>-<steps>-s<seed>-<hash>``; the hash covers everything that can change
    the result (the resolved config minus output/progress settings, and the process count)."""
    data = config_to_dict(config_from_dict(cfg))  # resolved: defaults filled, values canonical
    for dotted in ("run.out_dir", "run.progress", "run.tensorboard"):
        section, key = dotted.split(".")
        data[section].pop(key, None)
    blob = json.dumps({"config": data, "nproc": groups}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{method}-{size}-{steps}-s{seed}-{digest}"


def settings_label(settings: dict[str, Any]) -> str:
    """``lr=0.002 K=8 η=0.7 μ=0.5``: the tuned knobs of a setting."""
    names = {
        "inner.lr": "lr",
        "inner.muon_lr": "muon_lr",
        "outer.sync_every": "K",
        "outer.lr": "η",
        "outer.momentum": "μ",
    }
    parts = []
    for key, name in names.items():
        if key in settings:
            value = settings[key]
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"{name}={shown}")
    return " ".join(parts)
