"""The training job's one seam for observers: named events, a no-op unless one is installed.

The job calls :func:`emit` at a few fixed points; an *observer* is any callable
``observer(name, **info)``, installed with :func:`install` (or, for a block, :func:`observing`).
Nothing in a real run installs one: the tests do, to inject faults
(:mod:`diloco.testing.faults`, switched on by ``DILOCO_TEST_*`` environment variables).

Events, in the order a run emits them:

``"after_backward"`` (``step``, ``dl``, ``rank``, ``world``)
    Every rank, after the backward pass of inner step ``step`` (before clipping and the inner
    optimiser's step); ``dl`` is the DiLoCo wrapper.
``"before_checkpoint_rename"`` (``step``)
    Rank 0, once checkpoint ``step_<step>.tmp/`` is complete (meta.json written) and before it
    is renamed to ``step_<step>/``.
``"exchange"`` (``group``, ``round``, ``shard``)
    Every rank of an elastic group, inside the exchange of round ``round`` (this round's quorum
    formed and its process group built, its collectives not yet issued).
``"ray_checkpoint_reported"`` (``round``, ``rank``, ``world``, ``attempt``)
    Every rank under ``diloco launch ray``, after the checkpoint that ends round ``round`` has
    been reported to Ray (``attempt``: 0 on the first attempt).

An observer may raise (the exception propagates out of the job, as a crash would).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Observer", "emit", "install", "observing", "uninstall"]

Observer = Callable[..., None]

_observers: list[Observer] = []


def emit(name: str, **info: Any) -> None:
    """Tell every installed observer that ``name`` happened (nothing when none is installed)."""
    for observer in tuple(_observers):
        observer(name, **info)


def install(observer: Observer) -> None:
    """Install ``observer`` (once: installing it again does nothing)."""
    if observer not in _observers:
        _observers.append(observer)


def uninstall(observer: Observer) -> None:
    """Remove ``observer`` if it is installed."""
    if observer in _observers:
        _observers.remove(observer)


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """``observer`` installed for the duration of the block."""
    install(observer)
    try:
        yield
    finally:
        uninstall(observer)
