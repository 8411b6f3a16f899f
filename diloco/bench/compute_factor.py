"""Compute factor: how much sooner a method reaches the baseline's final val loss.

A curve is a list of ``(x, val_loss)`` eval points, ``x`` in steps or tokens, increasing.
The *reach point* of a curve for a target loss is the first ``x`` at which the curve gets down
to the target: find the first eval point with ``loss <= target``; if it is not the curve's
first point, interpolate linearly in ``x`` between it and the point before (whose loss is still
above the target). Later dips or rebounds do not count: it is the *first* crossing.

    compute_factor = reach(baseline, target) / reach(method, target),
    target        = the baseline's final val loss (its last eval point).

So > 1 means the method needs fewer steps (tokens) than the baseline to match the baseline's
final loss, and the baseline's own factor is 1.0 by construction. A method that never reaches
the target has no factor (``None``); all we know then is the upper bound
``reach(baseline) / x_last(method)`` (:func:`factor_bound`), shown as ``<bound (not reached)``.
Non-finite losses (a diverged run) never reach anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["compute_factor", "factor_bound", "format_factor", "mean_curve", "reach_point"]

Curve = Sequence[tuple[float, float]]


def reach_point(curve: Curve, target: float) -> float | None:
    """First ``x`` at which ``curve`` reaches ``loss <= target`` (interpolated), or None."""
    prev: tuple[float, float] | None = None
    for x, y in curve:
        if math.isfinite(y) and y <= target:
            if prev is None or not math.isfinite(prev[1]):
                return float(x)
            x0, y0 = prev
            return x0 + (y0 - target) / (y0 - y) * (x - x0)  # y0 > target >= y
        prev = (x, y)
    return None


def compute_factor(baseline: Curve, method: Curve, target: float | None = None) -> float | None:
    """``reach(baseline, target) / reach(method, target)``; target defaults to the baseline's
    final loss. None when the method never reaches the target (or the baseline never does)."""
    if not baseline or not method:
        return None
    if target is None:
        target = baseline[-1][1]
    if not math.isfinite(target):
        return None
    base = reach_point(baseline, target)
    reached = reach_point(method, target)
    if base is None or reached is None:
        return None
    if reached <= 0:  # reached at x = 0 (before training): infinitely faster
        return math.inf if base > 0 else 1.0
    return base / reached


def factor_bound(baseline: Curve, method: Curve, target: float | None = None) -> float | None:
    """Upper bound for a method that never reaches the target: reach(baseline) / x_last."""
    if not baseline or not method:
        return None
    if target is None:
        target = baseline[-1][1]
    base = reach_point(baseline, target) if math.isfinite(target) else None
    last = method[-1][0]
    return None if base is None or last <= 0 else base / last


def format_factor(factor: float | None, bound: float | None = None) -> str:
    """``1.23x``; ``<0.97x (not reached)`` for a method that never gets there; ``n/a``."""
    if factor is not None:
        return "inf" if math.isinf(factor) else f"{factor:.2f}x"
    if bound is not None:
        return f"<{bound:.2f}x (not reached)"
    return "n/a"


def mean_curve(curves: Sequence[Curve]) -> list[tuple[float, float]]:
    """Pointwise mean over the eval points (``x``) present in every curve (seeds of one setting)."""
    if not curves:
        return []
    common = set.intersection(*({x for x, _ in c} for c in curves))
    by_x = [dict(c) for c in curves]
    return [(x, sum(d[x] for d in by_x) / len(by_x)) for x in sorted(common)]
