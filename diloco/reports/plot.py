"""``diloco plot RUN_DIR ... --out curves.png``: loss curves of several runs on one figure.

Two panels against tokens seen (all groups together): validation loss of the slow weights θ
(left) and training loss of the fast weights (right). Each run is one colour, labelled with
:func:`diloco.reports.runs.method_label` or the caller's label, plus its final val loss.

matplotlib is optional (``pip install matplotlib``) and imported only here, when plotting.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diloco.errors import DilocoError
from diloco.reports.runs import Run

__all__ = ["plot_runs"]


def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's ``Figure`` and ``EngFormatter``, or a DilocoError saying how to install it."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise DilocoError(
            "diloco plot needs matplotlib: pip install matplotlib (or pip install 'diloco[plot]')"
        ) from None
    return Figure, EngFormatter


def plot_runs(runs: Sequence[Run], out: str | os.PathLike, title: str | None = None) -> Path:
    """Draw val and train loss against tokens for ``runs`` into the image file ``out``.

    The format follows the suffix of ``out`` (``.png``, ``.pdf``, ``.svg``). Returns the path.
    """
    figure_class, eng_formatter = _matplotlib()
    out = Path(out)
    fig = figure_class(figsize=(11, 4.4), layout="constrained")
    val_ax, train_ax = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors, strict=True):
        tokens, val = run.series("val_loss")
        final = f" — final {val[-1]:.3f}" if val else ""
        val_ax.plot(tokens, val, "o-", color=color, markersize=3.5, label=run.label + final)
        tokens, loss = run.series("loss")
        train_ax.plot(tokens, loss, "-", color=color, linewidth=1.2, label=run.label)
    for ax, name in ((val_ax, "validation loss (slow weights θ)"), (train_ax, "training loss")):
        ax.set_title(name)
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.xaxis.set_major_formatter(eng_formatter(sep=""))
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
    _zoom_on_tail(val_ax, runs, "val_loss")
    _zoom_on_tail(train_ax, runs, "loss")
    val_ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=150)
    except (OSError, ValueError) as e:
        raise DilocoError(f"cannot write plot '{out}': {e}") from None
    return out


def _zoom_on_tail(ax: Any, runs: Sequence[Run], key: str) -> None:
    """Clip the y range so the early loss spike does not flatten the part worth comparing.

    The top is the highest value after the first fifth of each run's points (at least the
    first point is dropped), the bottom the lowest value overall, each with a margin.
    """
    tails, lows = [], []
    for run in runs:
        _, values = run.series(key)
        if len(values) >= 2:
            tails.append(max(values[max(1, len(values) // 5) :]))
            lows.append(min(values))
    if tails:
        low, high = min(lows), max(tails)
        margin = 0.05 * (high - low) or 0.05
        ax.set_ylim(low - margin, high + 3 * margin)
