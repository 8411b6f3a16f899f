"""Reading finished (or running) run directories back: config, metrics and summary.

A run directory, as :func:`diloco.job.train.train` writes it, holds ``config.yaml`` (the resolved
config), ``metrics.jsonl`` (one record per logged step) and, once the run has finished,
``summary.json``. :func:`load_run` reads all three; :func:`method_label` names the method for
legends and tables. Used by ``diloco plot`` and ``diloco summary``; does not import torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diloco.errors import DilocoError
from diloco.files import read_json
from diloco.job.metrics import read_metrics

__all__ = ["Run", "load_run", "method_label"]

_INNER_NAMES = {"adamw": "AdamW", "sgd": "SGD", "muon": "Muon"}


@dataclass
class Run:
    """One run directory read back; ``summary`` is empty while the run has not finished."""

    path: Path
    label: str
    config: dict[str, dict[str, Any]]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(tokens, value) of every record with a finite number under ``key``."""
        tokens, values = [], []
        for record in self.metrics:
            value = record.get(key)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if is_number and math.isfinite(value):
                tokens.append(record["tokens"])
                values.append(value)
        return tokens, values


def method_label(config: dict[str, dict[str, Any]]) -> str:
    """A legend name from the config: method, inner optimiser, K and G.

    ``nesterov`` is SNOO with one group and DiLoCo with several; ``none`` is the inner optimiser
    alone. E.g. ``SNOO (AdamW, K=16)``, ``DiLoCo (AdamW, K=32, G=8)``, ``AdamW (no outer step)``.
    """
    outer, inner = config.get("outer", {}), config.get("inner", {})
    groups = config.get("topology", {}).get("groups", 1)
    method = outer.get("method", "nesterov")
    optimizer = inner.get("optimizer", "adamw")
    inner_name = _INNER_NAMES.get(optimizer, optimizer)
    if method == "none":
        return f"{inner_name} (no outer step)"
    name = {
        "nesterov": "SNOO" if groups == 1 else "DiLoCo",
        "sgd": "outer SGD",
        "ema_nesterov": "EMA-Nesterov",
    }.get(method, method)
    details = [inner_name, f"K={outer.get('sync_every', '?')}"]
    if groups != 1:
        details.append(f"G={groups}")
    return f"{name} ({', '.join(details)})"


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
    """Read the run directory at ``path``; ``label`` overrides :func:`method_label`.

    Raises :class:`DilocoError` when ``path`` is not a run directory (no ``metrics.jsonl``).
    """
    path = Path(path)
    metrics_path = path / "metrics.jsonl"
    if not path.is_dir():
        raise DilocoError(f"run directory not found: '{path}'")
    if not metrics_path.is_file():
        raise DilocoError(
            f"'{path}' has no metrics.jsonl; pass the run.out_dir of a diloco train run"
        )
    metrics = read_metrics(metrics_path)
    config = _read_yaml(path / "config.yaml")
    summary_path = path / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    if not isinstance(summary, dict):
        raise DilocoError(f"{summary_path} is damaged (not a JSON object)")
    return Run(path, label or method_label(config), config, metrics, summary)


def _read_yaml(path: Path) -> dict[str, dict[str, Any]]:
    """The resolved config; an empty dict when the run directory has none."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DilocoError(f"cannot read '{path}': {e}") from None
    return data if isinstance(data, dict) else {}
