"""A dependency-free progress bar: step, loss, tokens/s and ETA on one refreshed line.

On a terminal the line is redrawn in place; otherwise (CI logs, files) a plain line is printed
about every tenth of the run, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """``update(step, **fields)`` after each logged step; ``close()`` at the end."""

    def __init__(
        self, total: int, enabled: bool = True, stream: TextIO | None = None, start: int = 0
    ):
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start_step = start
        self.start_time = time.perf_counter()
        self._next_plain = start
        self._width = 24

    def update(self, step: int, **fields: float | str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        text = (
            f"{step}/{self.total} " + " ".join(parts) + f" | {_duration(elapsed)}<{_duration(eta)}"
        )
        if self.tty:
            filled = int(self._width * step / max(1, self.total))
            bar = "#" * filled + "." * (self._width - filled)
            self.stream.write(f"\r[{bar}] {text}\033[K")
            self.stream.flush()
        elif step >= self._next_plain or step == self.total:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._next_plain = step + max(1, self.total // 10)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
