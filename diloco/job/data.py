"""Offline corpora as flat 1-D token arrays, and seeded, resumable batch streams.

A corpus is two 1-D token tensors, ``train`` [N_train] and ``val`` [N_val], kept in their compact
on-disk dtype (``uint8`` bytes or ``uint16`` GPT-2 tokens); windows are widened to ``int64`` one
batch at a time. Sources (``data.source``):

* ``embedded`` -- bytes of the running interpreter's standard-library ``.py`` files (vocab 256).
* ``text:PATH`` -- any UTF-8 file, byte-level (vocab 256), memory-mapped.
* ``bin:GLOB`` -- nanoGPT / modded-nanogpt ``uint16`` token shards, each memory-mapped
  (several are read through :class:`TokenShards`, never concatenated in memory).
* ``hf:PATH`` (and ``text:PATH`` with ``data.tokenizer``) -- documents tokenized and packed
  with EOS separators (:mod:`diloco.job.hf_data`).

Validation tokens come from ``data.val_source`` (:func:`load_corpus`).

A window of ``seq_len + 1`` tokens starting at ``s`` gives ``x = tokens[s : s+T]`` and
``y = tokens[s+1 : s+T+1]``: ``y[b, t]`` is the token that follows ``x[b, t]``.
"""

from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import os
import platform
import struct
import sysconfig
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from diloco.errors import CheckpointError, DataError

EMBEDDED_TRAIN_CAP = 24 * 2**20
"""Bytes of the embedded train split kept: the first 24 MiB in sorted-path order."""
EMBEDDED_VAL_CAP = 2 * 2**20
"""Bytes of the embedded val split kept: the first 2 MiB in sorted-path order."""
BIN_MAGIC = 20240520
BIN_VERSION = 1
BIN_HEADER_BYTES = 256 * 4
GPT2_VOCAB = 50304
"""GPT-2's 50257 tokens padded up to a multiple of 64."""

_SEPARATOR = b"\n\n"
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_SOURCES = "embedded, text:PATH, bin:GLOB or hf:PATH"


class TokenShards:
    """Token shards read as one 1-D array, their concatenation, without concatenating them:
    every shard stays memory-mapped (pages are read as windows touch them, nothing is copied
    into RAM), and ``tokens[idx]`` gathers the tokens at global positions ``idx`` (an int64
    tensor of any shape) from the shards that hold them, as ``int64``. A window may straddle
    two shards, exactly as in the concatenation."""

    def __init__(self, shards: list[torch.Tensor]) -> None:
        self.shards = shards
        sizes = torch.tensor([s.numel() for s in shards])
        self.starts = torch.cumsum(sizes, 0) - sizes  # global position of each shard's first
        self.dtype = shards[0].dtype

    def numel(self) -> int:
        return int(sum(s.numel() for s in self.shards))

    def dim(self) -> int:
        return 1

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        which = torch.searchsorted(self.starts, idx, right=True) - 1
        out = torch.empty(idx.shape, dtype=torch.long)
        for k in which.unique().tolist():
            at = which == k
            out[at] = self.shards[k][idx[at] - self.starts[k]].long()
        return out


Tokens = torch.Tensor | TokenShards
"""A 1-D token array: one tensor (``uint8``/``uint16``, possibly memory-mapped) or shards."""


@dataclass(frozen=True)
class Corpus:
    """Train and val token arrays (:data:`Tokens`) and their vocabulary size."""

    train: Tokens
    val: Tokens
    vocab_size: int
    description: str
    packed: bool = False  # hf: documents packed into windows (diloco.job.hf_data.PackedStream)


#: Reads a tokenized source: (source, setting, held_out) -> (train, val, vocab, description), or
#: None for a source it leaves to :func:`load_corpus` (see :func:`diloco.job.hf_data.load_data`).
Reader = Callable[[str, str, bool], "tuple[Tokens, Tokens | None, int, str] | None"]


def load_corpus(
    source: str, seq_len: int, val_source: str = "auto", reader: Reader | None = None
) -> Corpus:
    """Load ``source`` (``embedded``, ``text:PATH``, ``bin:GLOB`` or ``hf:PATH``) for windows of
    ``seq_len``. ``reader`` reads the sources a tokenizer turns into tokens (``hf:PATH``, and
    ``text:PATH`` with ``data.tokenizer``: :func:`diloco.job.hf_data.load_data`); without it a
    ``text:`` file is byte tokens and ``hf:`` is refused.

    ``val_source`` (``data.val_source``): ``heldout`` takes val from ``source`` (its last bin
    shard, the last tenth of a single shard or text file, the embedded val files); ``text:PATH``
    or ``bin:GLOB`` reads val whole from there, and ``source`` trains on all of its tokens;
    ``auto`` is ``bin:`` of the ``*_val_*`` shards beside a ``bin:…_train_…`` glob when it
    matches files (nanoGPT / modded-nanogpt's ``fineweb_val_*.bin``), else ``heldout``.
    Both splits must hold at least ``seq_len + 1`` tokens (one window), else :class:`DataError`.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}; set model.block_size >= 1")
    val_from = _val_source(source, val_source)

    def load(source: str, key: str, held_out: bool) -> tuple[Tokens, Tokens | None, int, str]:
        read = reader(source, key, held_out) if reader is not None else None
        return read if read is not None else _load(source, key, seq_len, held_out)

    train, val, vocab_size, description = load(source, "data.source", held_out=val_from is None)
    if val_from is not None:
        val, _, val_vocab, val_description = load(val_from, "data.val_source", held_out=False)
        vocab_size = max(vocab_size, val_vocab)
        description += f"; val: {val_description}"
    corpus = Corpus(train, val, vocab_size, description, packed=source.startswith("hf:"))
    for split, tokens in (("train", corpus.train), ("val", corpus.val)):
        if tokens.numel() < seq_len + 1:
            raise DataError(
                f"corpus {source!r} has {tokens.numel()} {split} tokens but needs at least "
                f"seq_len+1 = {seq_len + 1}; lower model.block_size or give a larger corpus"
            )
    return corpus


def _val_source(source: str, val_source: str) -> str | None:
    """The source val is read from whole, or None: held out from ``source``."""
    if val_source == "heldout":
        return None
    if val_source != "auto":
        return val_source
    head, name = os.path.split(source.removeprefix("bin:"))
    if not source.startswith("bin:") or "_train_" not in name:
        return None
    sibling = os.path.join(head, name.replace("_train_", "_val_"))
    return f"bin:{sibling}" if _glob(sibling) else None


def _load(
    source: str, key: str, seq_len: int, held_out: bool
) -> tuple[Tokens, Tokens | None, int, str]:
    """(train, val, vocabulary size, description) of ``source`` (the setting ``key``); with
    ``held_out`` False, train is every token and val None."""
    if source.startswith("hf:"):
        raise DataError(f"{key}={source!r} needs a tokenizer; set data.tokenizer=PATH")
    if source == "embedded":
        train, val, description = _embedded()
        return train, val if held_out else None, 256, description
    if source.startswith("text:"):
        return _load_text(source.removeprefix("text:"), seq_len, held_out)
    if source.startswith("bin:"):
        return _load_bin(source.removeprefix("bin:"), held_out)
    raise DataError(f"unknown corpus source {source!r}; use one of {_SOURCES}")


# ---------------------------------------------------------------------------------------------
# embedded: the standard library's .py sources


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Relative POSIX paths of the embedded corpus's (train, val) files, in corpus order.

    All ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, skipping any directory named
    ``test``, ``tests``, ``idle_test`` or ``site-packages``, sorted by path. A file is in val when
    ``zlib.crc32(path) % 20 == 0`` (about 5%), a split that is stable across runs and machines.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]
        rel = Path(os.path.relpath(directory, root))
        paths += [(rel / f).as_posix() for f in files if f.endswith(".py")]
    paths.sort()
    val = tuple(p for p in paths if zlib.crc32(p.encode()) % 20 == 0)
    train = tuple(p for p in paths if zlib.crc32(p.encode()) % 20 != 0)
    return train, val


@functools.lru_cache(maxsize=1)
def _embedded() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Build (train, val, description) once per process (~0.05 s for 12 MiB, warm disk cache)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train_files, val_files = stdlib_files()
    train = _join_files(root, train_files, EMBEDDED_TRAIN_CAP)
    val = _join_files(root, val_files, EMBEDDED_VAL_CAP)
    description = (
        f"embedded: Python {platform.python_version()} stdlib .py sources at {root} "
        f"({len(train_files)} train / {len(val_files)} val files, "
        f"{train.numel()} / {val.numel()} bytes, byte-level vocab 256)"
    )
    return train, val, description


def _join_files(root: Path, files: tuple[str, ...], cap: int) -> torch.Tensor:
    """Bytes of ``files`` joined by ``b"\\n\\n"``, truncated to ``cap`` bytes, as ``uint8``."""
    buf = bytearray()
    for rel in files:
        if len(buf) >= cap:
            break
        if buf:
            buf += _SEPARATOR
        buf += (root / rel).read_bytes()
    del buf[cap:]
    return torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# text:PATH


def _load_text(
    path_str: str, seq_len: int, held_out: bool
) -> tuple[Tokens, Tokens | None, int, str]:
    """Bytes of a UTF-8 file, memory-mapped; held out: val is the last ``max(10%, seq_len + 1)``
    bytes, train the rest."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DataError(f"text corpus {path} does not exist or is not a file; fix data.source")
    n = path.stat().st_size
    if n == 0:
        raise DataError(f"text corpus {path} is empty; give a non-empty UTF-8 file")
    _check_utf8(path)
    tokens = torch.from_file(str(path), shared=False, size=n, dtype=torch.uint8)
    if not held_out:
        return tokens, None, 256, f"text:{path} ({n} bytes, byte-level vocab 256)"
    train, val = hold_out(tokens, seq_len, f"text corpus {path}")
    description = f"text:{path} ({len(train)} train / {len(val)} val bytes, byte-level vocab 256)"
    return train, val, 256, description


def hold_out(tokens: torch.Tensor, seq_len: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a corpus of n tokens into (train, val): the last max(n/10, seq_len + 1) tokens are
    the validation set (views, no copy). Raises DataError, naming ``what``, when the training
    part would hold less than one window."""
    n = tokens.numel()
    n_val = max(n // 10, seq_len + 1)
    if n - n_val < seq_len + 1:
        raise DataError(
            f"{what} has {n} tokens but needs at least {n_val + seq_len + 1} for "
            f"model.block_size={seq_len}; lower model.block_size or give more data"
        )
    return tokens[: n - n_val], tokens[n - n_val :]


def _check_utf8(path: Path, chunk_bytes: int = 1 << 22) -> None:
    """Decode ``path`` in chunks; raise :class:`DataError` at the first invalid byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a split sequence carried over
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"text corpus {path} is not valid UTF-8 (byte {offset - pending + e.start}); "
                    "convert it to UTF-8 or tokenize it into bin: shards"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


# ---------------------------------------------------------------------------------------------
# bin:GLOB


def _glob(pattern: str) -> list[str]:
    """The files matching ``pattern`` (``~`` expanded, ``**`` recursive), sorted."""
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    return sorted(p for p in matches if os.path.isfile(p))


def _load_bin(pattern: str, held_out: bool) -> tuple[Tokens, Tokens | None, int, str]:
    """Shards matching ``pattern``, sorted; held out: the last is val when there are >= 2,
    else the last 10% of the single shard's tokens is val.

    Each shard is memory-mapped after reading its 1 KiB header, nothing else (several are one
    :class:`TokenShards`). The vocabulary is :data:`GPT2_VOCAB` (50304): the format holds
    GPT-2 tokens; a token at or past ``model.vocab_size`` stops the run when a batch holds it
    (:func:`check_tokens`).
    """
    paths = _glob(pattern)
    if not paths:
        raise DataError(f"bin:{pattern} matches no files; fix the glob in data.source")
    shards = [_open_shard(Path(p)) for p in paths]
    if not held_out:
        train, val = _joined(shards), None
    elif len(shards) >= 2:
        train, val = _joined(shards[:-1]), shards[-1]
    else:
        n = shards[0].numel()
        train, val = shards[0][: n - n // 10], shards[0][n - n // 10 :]
    split = f"{train.numel()} train / {val.numel()} val" if val is not None else train.numel()
    description = f"bin:{pattern} ({len(paths)} shard file(s), {split} tokens)"
    return train, val, GPT2_VOCAB, description


def _joined(shards: list[torch.Tensor]) -> Tokens:
    return shards[0] if len(shards) == 1 else TokenShards(shards)


def _open_shard(path: Path) -> torch.Tensor:
    """Memory-map one shard's tokens after checking its header: int32 [magic, version, n, ...]."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token shard {path} is empty; re-create it or remove it from the glob")
    with path.open("rb") as f:
        header = f.read(BIN_HEADER_BYTES)
    if len(header) < BIN_HEADER_BYTES:
        raise DataError(
            f"token shard {path} is {size} bytes, shorter than its {BIN_HEADER_BYTES}-byte "
            "header; the file is truncated, re-create it"
        )
    magic, version, n = struct.unpack_from("<3i", header)
    if magic != BIN_MAGIC:
        raise DataError(
            f"token shard {path} has magic {magic}, expected {BIN_MAGIC}; "
            "it is not a nanoGPT/modded-nanogpt .bin token shard"
        )
    if version != BIN_VERSION:
        raise DataError(
            f"token shard {path} has version {version}, expected {BIN_VERSION}; "
            "re-export it in the version-1 format"
        )
    expected = BIN_HEADER_BYTES + 2 * n
    if size != expected:
        raise DataError(
            f"token shard {path} is {size} bytes but its header says {n} tokens "
            f"({expected} bytes); the file is truncated or corrupt, re-create it"
        )
    if n == 0:
        raise DataError(f"token shard {path} holds 0 tokens; re-create it or remove it")
    tokens = torch.from_file(str(path), shared=False, size=size // 2, dtype=torch.uint16)
    return tokens[BIN_HEADER_BYTES // 2 :]


# ---------------------------------------------------------------------------------------------
# batches


class BatchStream:
    """Random windows of a token array, reproducible from ``(seed, stream)`` and resumable.

    Each ``next()`` draws ``batch_size`` start offsets ``s ~ U{0, N - seq_len - 1}`` from a
    ``torch.Generator`` seeded by a hash of ``(seed, stream)``, so worker groups with different
    ``stream`` ids see different data and every stream can be replayed exactly. With
    ``vocab_size`` every batch is checked with :func:`check_tokens`.
    """

    def __init__(
        self,
        tokens: Tokens,
        batch_size: int,
        seq_len: int,
        seed: int,
        stream: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if tokens.numel() < seq_len + 1:
            raise DataError(
                f"{tokens.numel()} tokens cannot fill one window of seq_len+1 = {seq_len + 1}; "
                "lower model.block_size or give a larger corpus"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.stream = stream
        self.vocab_size = vocab_size
        self.batches = 0
        self.generator = torch.Generator().manual_seed(_stream_seed(seed, stream))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next group batch: ``x``, ``y`` int64 [batch_size, seq_len], ``y`` = ``x`` + 1."""
        high = self.tokens.numel() - self.seq_len
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        self.batches += 1
        x, y = _windows(self.tokens, starts, self.seq_len)
        if self.vocab_size is not None:
            check_tokens(x, y, self.vocab_size, f"training batch {self.batches}")
        return x, y

    def state_dict(self) -> dict:
        """Exact position: the generator state and the number of batches drawn so far."""
        return {
            "seed": self.seed,
            "stream": self.stream,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "batches": self.batches,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the stream's seed, id and shapes must match it."""
        keys = ("seed", "stream", "batch_size", "seq_len")
        mismatched = [
            f"{k}={state[k]} (now {getattr(self, k)})" for k in keys if state[k] != getattr(self, k)
        ]
        if mismatched:
            raise CheckpointError(
                f"saved data stream has {', '.join(mismatched)}; resume with the saved "
                "settings or start a new run"
            )
        self.generator.set_state(state["generator"])
        self.batches = state["batches"]


def shard_batch(
    x: torch.Tensor, y: torch.Tensor, shard: int, shards: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[shard * B/S, (shard + 1) * B/S)`` of a group batch: data-parallel rank ``shard``."""
    B = x.shape[0]
    if B % shards:
        raise ValueError(f"batch size {B} is not divisible by {shards} data-parallel shards")
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is out of range for {shards} shards")
    rows = slice(shard * B // shards, (shard + 1) * B // shards)
    return x[rows], y[rows]


def eval_batches(
    tokens: Tokens, batch_size: int, seq_len: int, n_batches: int, vocab_size: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` fixed batches of windows evenly spaced over ``tokens`` (no randomness),
    checked with :func:`check_tokens` when ``vocab_size`` is given.

    Window ``i`` of ``W = n_batches * batch_size`` starts at ``i * (N - seq_len - 1) // (W - 1)``,
    so the first window starts the array and the last one ends it.
    """
    if tokens.numel() < seq_len + 1:
        raise DataError(
            f"{tokens.numel()} eval tokens cannot fill one window of seq_len+1 = {seq_len + 1}; "
            "lower model.block_size or give a larger val split"
        )
    n_windows = n_batches * batch_size
    last = tokens.numel() - seq_len - 1
    starts = torch.arange(n_windows) * last // max(n_windows - 1, 1)
    batches = [_windows(tokens, s, seq_len) for s in starts.split(batch_size)]
    for i, (x, y) in enumerate(batches):
        if vocab_size is not None:
            check_tokens(x, y, vocab_size, f"validation batch {i + 1}")
    return batches


def check_tokens(x: torch.Tensor, y: torch.Tensor, vocab_size: int, what: str) -> None:
    """Raise :class:`DataError` if a token of a batch is ``>= vocab_size`` (the embedding has
    no row for it: an index error on the CPU, a device-side assert on CUDA)."""
    top = int(torch.maximum(x.max(), y.max()))
    if top >= vocab_size:
        raise DataError(
            f"{what} holds token {top}, past model.vocab_size={vocab_size}; set "
            f"model.vocab_size >= {-(-(top + 1) // 64) * 64} (a multiple of 64) for this corpus"
        )


def _windows(
    tokens: Tokens, starts: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``tokens[s : s + seq_len + 1]`` per start as int64, split into (x, y)."""
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _stream_seed(seed: int, stream: int) -> int:
    """A 64-bit generator seed from ``(seed, stream)``, stable across processes and machines."""
    digest = hashlib.sha256(f"diloco-data/{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
