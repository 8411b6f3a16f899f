"""Files a run writes and reads back: whole or not at all, and damage reported in one line.

Every output is written next to its final name (``NAME.tmp-<pid>``), flushed to the disk and
renamed over the final name, so a reader sees the old file or the new one, never a torn one;
a failed write (a full disk) removes its temporary file and raises a
:class:`~diloco.errors.DilocoError` naming the file. Readers of JSON turn an empty or damaged
file into a DilocoError naming it. Torch-free: the config layer writes ``config.yaml`` with it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from diloco.errors import DilocoError

__all__ = ["fsync_dir", "read_json", "write_atomic", "write_text_atomic", "writing_atomically"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush directory ``path``'s entries (a rename into it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    The writer must flush what it wrote to the disk (``os.fsync``) if it opens the file itself;
    :func:`write_text_atomic` does. Any failure removes the temporary file; an ``OSError``
    becomes a DilocoError ``cannot write PATH: <reason>``.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise DilocoError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


class _Sink:
    """A binary file for a serialiser (``torch.save``) that keeps the first ``OSError`` of a
    write: a serialiser may report it as its own error type, without the reason."""

    def __init__(self, f: BinaryIO):
        self.file, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file that then replaces ``path`` (see
    :func:`writing_atomically`); a failed write raises ``cannot write PATH: <reason>``."""
    with writing_atomically(path) as tmp, open(tmp, "wb") as f:
        sink = _Sink(f)
        try:
            write(sink)
        except Exception:
            if sink.error is not None:
                raise sink.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: the old file or the new one, never part."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in ``path``; an unreadable, empty or damaged file raises a DilocoError
    naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as e:
        raise DilocoError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not text.strip():
        raise DilocoError(f"{path} is empty (damaged: a write that never finished?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DilocoError(f"{path} is damaged (not JSON: {e.msg} at line {e.lineno})") from None
