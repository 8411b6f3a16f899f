"""User-facing errors and warnings: one clear line, no traceback.

Everything a user can cause (a bad config key, a missing file, a world size that does not match
the topology) raises a subclass of :class:`DilocoError`. The CLI prints ``diloco: error: <msg>``
and exits with status 2. Bugs stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

import sys


class DilocoError(Exception):
    """An error caused by user input; its message is the whole report."""


class ConfigError(DilocoError):
    """A config key, type or value that cannot be used."""


class DataError(DilocoError):
    """A corpus that is missing, empty, too small or malformed."""


class TopologyError(DilocoError):
    """A world size or process layout that does not match ``topology``."""


class CheckpointError(DilocoError):
    """A checkpoint that is missing, corrupt or does not fit the run."""


def warn(message: str, enabled: bool = True) -> None:
    """One ``diloco: warning: …`` line on stderr (pass ``enabled=runtime.is_main``)."""
    if enabled:
        print(f"diloco: warning: {message}", file=sys.stderr, flush=True)


def note(message: str, enabled: bool = True) -> None:
    """One ``diloco: …`` line on stderr: what a run decided (pass ``enabled=runtime.is_main``)."""
    if enabled:
        print(f"diloco: {message}", file=sys.stderr, flush=True)
