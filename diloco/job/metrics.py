"""Run outputs: ``metrics.jsonl`` (one JSON object per log step), ``summary.json``, TensorBoard.

Only the main rank writes; other ranks get a logger whose methods do nothing. ``metrics.jsonl``
is appended to, one whole line per record; a run stopped mid-write (a full disk, a kill) can
leave a torn last line, which :func:`read_metrics` skips. A resumed run rewrites the file
atomically (:func:`diloco.files.write_text_atomic`).
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any

from diloco.errors import DilocoError
from diloco.files import write_text_atomic

__all__ = ["WANDB_MISSING", "MetricsLogger", "peak_rss_mb", "read_metrics"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class MetricsLogger:
    """Appends records to ``out_dir/metrics.jsonl`` and mirrors their finite scalars to
    TensorBoard (``tensorboard``) and Weights & Biases (``wandb``: ``offline`` or ``online``,
    a W&B run in ``out_dir/wandb`` named after the run directory, with ``config`` as its config;
    project ``diloco`` unless ``WANDB_PROJECT`` says otherwise)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        enabled: bool,
        tensorboard: bool = False,
        wandb: str = "off",
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        if wandb != "off":
            self._wandb = _wandb_run(Path(out_dir), wandb, config or {})

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites what the crashed one logged)."""
        if not self.enabled or not self.path.exists():
            return
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._file.flush()
        except OSError as e:
            raise DilocoError(f"cannot write {self.path}: {e.strerror or e}") from None
        step = record["step"]
        scalars = {
            key: value
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(out_dir: Path, mode: str, config: dict[str, Any]) -> Any:
    """A W&B run logging into ``out_dir/wandb`` (``mode``: offline or online)."""
    try:
        import wandb
    except ImportError:
        raise DilocoError(WANDB_MISSING.format(mode=mode)) from None
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "diloco"),
        name=out_dir.name,
        dir=str(out_dir),
        mode=mode,
        config=config,
        settings=wandb.Settings(console="off"),  # leave stderr (the progress bar) alone
    )


#: The error for ``run.wandb`` without the wandb package (checked before any work, too).
WANDB_MISSING = (
    "run.wandb={mode} needs the wandb package: pip install wandb (or pip install -e "
    "'.[wandb]'), or set run.wandb=off"
)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file; a torn last line (a write cut short) is skipped.

    Raises:
        OSError: the file cannot be opened (``FileNotFoundError``: not written yet).
        DilocoError: the file is not UTF-8, or a line before the last is not a JSON record.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeError:
        raise DilocoError(f"{path} is damaged: not UTF-8 text") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the last write was cut short
                break
            raise DilocoError(f"{path} is damaged: line {number} is not a JSON record") from None
        if not isinstance(record, dict) or "step" not in record:
            raise DilocoError(f"{path} is damaged: line {number} is not a metrics record")
        records.append(record)
    return records
