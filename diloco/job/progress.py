"""Progress of a run: step, loss, val loss (and how old it is), tokens/s and ETA.

On a terminal a `tqdm <https://tqdm.github.io>`_ bar is redrawn in place; otherwise (CI logs,
files) a plain line is printed about every tenth of the run, so logs stay short. The val loss is
measured only every ``train.eval_every`` steps: the line shows it bare on the step it was
measured and as ``val 3.21 (step 500)`` afterwards. Only the main rank shows progress (the
caller passes ``enabled``).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

__all__ = ["ProgressBar"]


class ProgressBar:
    """:meth:`set_val` after each evaluation, :meth:`update` after each logged step,
    :meth:`close` at the end. ``start``: the step a resumed run continues after."""

    def __init__(
        self, total: int, enabled: bool = True, stream: TextIO | None = None, start: int = 0
    ):
        self.total, self.enabled, self.start = total, enabled, start
        self.stream = stream or sys.stderr
        self.start_time = time.perf_counter()
        self._val: tuple[int, float] | None = None  # (step, val loss)
        self._next_plain = start
        self._bar = None
        if enabled and self.stream.isatty():
            self._bar = tqdm(
                total=total, initial=start, file=self.stream, unit="step", dynamic_ncols=True
            )

    def set_val(self, step: int, val_loss: float) -> None:
        """The val loss measured after ``step`` (shown bare at that step, with its step later)."""
        self._val = (step, val_loss)

    def fields(self, step: int, loss: float, tokens_per_s: float) -> str:
        """``loss 2.31 val 2.4 (step 100) tok/s 5120``."""
        text = f"loss {loss:.4g}"
        if self._val is not None:
            at, val = self._val
            text += f" val {val:.4g}" + ("" if at == step else f" (step {at})")
        return text + f" tok/s {tokens_per_s:.0f}"

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Show the state after ``step``."""
        if not self.enabled:
            return
        fields = self.fields(step, loss, tokens_per_s)
        if self._bar is not None:
            self._bar.set_postfix_str(fields, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        if step < self._next_plain and step != self.total:
            return
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        times = f"{tqdm.format_interval(elapsed)}<{tqdm.format_interval(eta)}"
        self.stream.write(f"{step}/{self.total} {fields} | {times}\n")
        self.stream.flush()
        self._next_plain = step + max(1, self.total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
