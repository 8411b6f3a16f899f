"""Run outputs: ``metrics.jsonl`` (one JSON object per log step), ``summary.json``, TensorBoard.

Only the main rank writes; other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "peak_rss_mb", "read_metrics"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class MetricsLogger:
    """Appends records to ``out_dir/metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites what the crashed one logged)."""
        if not self.enabled or not self.path.exists():
            return
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
