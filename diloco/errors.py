"""User-facing errors and warnings: one clear line, no traceback.

Everything a user can cause (a bad config key, a missing file, a world size that does not match
the topology) raises a subclass of :class:`DilocoError`. The CLI prints ``diloco: error: <msg>``
and exits with status 2. Bugs stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


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


def write_line(text: str) -> None:
    """``text`` and its newline on stderr in one ``os.write``: the ranks of a job share the
    stream, and ``print`` (unbuffered: ``PYTHONUNBUFFERED=1``) writes the two separately, so
    two ranks' lines could land on one line. Falls back to ``sys.stderr.write`` when stderr
    has no file descriptor (a test's capture)."""
    data = (text + "\n").encode()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        return
    sys.stderr.flush()  # whatever Python still holds goes first
    while data:  # one call unless the pipe takes less (never for a line under PIPE_BUF)
        data = data[os.write(fd, data) :]


def warn(message: str, enabled: bool = True) -> None:
    """One ``diloco: warning: …`` line on stderr (pass ``enabled=runtime.is_main``)."""
    if enabled:
        write_line(f"diloco: warning: {message}")


def note(message: str, enabled: bool = True) -> None:
    """One ``diloco: …`` line on stderr: what a run decided (pass ``enabled=runtime.is_main``)."""
    if enabled:
        write_line(f"diloco: {message}")


#: The longest a failing rank waits for the other ranks of its node to report (seconds).
RANK_REPORT_TIMEOUT_S = 20.0


def report_error(message: str) -> None:
    """``diloco: error: <message>`` on stderr. Under torchrun (``WORLD_SIZE`` > 1) the other
    ranks usually hit the same error, and the launcher stops every rank once the first one
    exits: so wait until every rank of this node has written its line (or
    :data:`RANK_REPORT_TIMEOUT_S` have passed, for an error only some ranks hit), then return.

    The ranks of a node meet in a directory named after their launcher process (the common
    parent, ``os.getppid()``) and its restart count: each writes a file once its line is out;
    the last one out removes the directory.
    """
    write_line(f"diloco: error: {message}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or local <= 1:
        return
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    meeting = Path(tempfile.gettempdir()) / f"diloco-rank-errors-{os.getppid()}-{restart}"
    rank = os.environ.get("LOCAL_RANK", "0")
    try:
        meeting.mkdir(exist_ok=True)
        (meeting / f"reported{rank}").touch()
        deadline = time.monotonic() + RANK_REPORT_TIMEOUT_S
        while len(list(meeting.glob("reported*"))) < local and time.monotonic() < deadline:
            time.sleep(0.05)
        (meeting / f"done{rank}").touch()
        if len(list(meeting.glob("done*"))) == local:
            for f in meeting.iterdir():
                f.unlink(missing_ok=True)
            meeting.rmdir()
    except OSError:  # a read-only or vanished temp dir: nothing to wait with
        pass
