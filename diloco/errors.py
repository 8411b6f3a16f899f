"""User-facing errors: one clear line, no traceback.

Everything a user can cause (a bad config key, a missing file, a world size that does not match
the topology) raises a subclass of :class:`DilocoError`. The CLI prints ``diloco: error: <msg>``
and exits with status 2. Bugs stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations


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
