"""``hf:PATH`` corpora: local dataset files read with ``datasets``, tokenized once, packed.

PATH is a ``datasets.save_to_disk`` folder, a parquet / jsonl / json / arrow file, or a folder of
them. The text column (``data.text_column``) of every row, in order, is tokenized and each
document is followed by the tokenizer's end-of-text id:

    tokens = doc_0 EOS doc_1 EOS … doc_{D-1} EOS        (1-D, uint16 when V <= 65536, else int32)

The array is cached in ``.diloco-cache/`` beside the data (a folder: inside it), keyed by the
files (paths, sizes, modification times), the tokenizer's definition and the column, and
memory-mapped on later runs; where that folder cannot be written, the tokens are made on the fly
in each run. ``text:FILE`` with a tokenizer is the same with the whole file as one document.

:class:`PackedStream` cuts the train tokens into windows of T + 1 tokens starting every T
tokens (the next window's first input is this window's last target), gives group g of G the
contiguous part ``[g·W/G, (g+1)·W/G)`` of the W windows, and serves them in a seeded shuffled
order, epoch after epoch; its position (epoch, index) is checkpointed, so a resume is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diloco.comm.topology import Runtime
from diloco.config import Config
from diloco.errors import CheckpointError, ConfigError, DataError
from diloco.files import write_atomic
from diloco.job.data import BatchStream, Corpus, check_tokens, hold_out, load_corpus
from diloco.job.tokenizer import TextTokenizer, load_tokenizer, tokenizer_path

__all__ = [
    "PackedStream",
    "hf_tokens",
    "load_data",
    "load_tokenized",
    "make_stream",
    "text_tokens",
]

CACHE_DIR = ".diloco-cache"
_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}
_ROWS_PER_BATCH = 1000
TEXT_CHUNK = 1 << 20  # characters of a text: file tokenized as one piece


def hf_tokens(source: str, tokenizer: TextTokenizer, column: str, key: str) -> torch.Tensor:
    """The packed tokens of ``hf:PATH`` (see the module docstring), cached beside the data.

    Raises:
        DataError: a missing path, no dataset files, no ``column``, or no documents.
    """
    path = Path(source.removeprefix("hf:")).expanduser()
    if not path.exists():
        raise DataError(f"{key}={source!r}: {path} does not exist; fix the path")
    files = _data_files(path, key, source)
    cache = _cache_file(path, files, tokenizer, column)
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    dataset = _read_dataset(path, files, key, source)
    if column not in dataset.column_names:
        raise DataError(
            f"{key}={source!r} has no column {column!r} (columns: "
            f"{', '.join(dataset.column_names)}); set data.text_column to the text column"
        )
    pieces = []
    for start in range(0, len(dataset), _ROWS_PER_BATCH):
        texts = [t or "" for t in dataset[start : start + _ROWS_PER_BATCH][column]]
        pieces += _with_eos(tokenizer.encode(texts), tokenizer.eos_id)
    if not pieces:
        raise DataError(f"{key}={source!r} holds no rows; give a dataset with documents")
    return _save_cache(cache, np.concatenate(pieces), tokenizer.vocab_size)


def text_tokens(path: Path, tokenizer: TextTokenizer) -> torch.Tensor:
    """The tokens of a UTF-8 file, one document, then EOS (cached as :func:`hf_tokens`)."""
    cache = _cache_file(path, [path], tokenizer, "")
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text corpus {path} is not valid UTF-8 (byte {e.start})") from None
    pieces = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode(text_chunks(text))]
    tokens = np.concatenate([*pieces, np.asarray([tokenizer.eos_id], dtype=np.int64)])
    return _save_cache(cache, tokens, tokenizer.vocab_size)


def text_chunks(text: str, size: int = TEXT_CHUNK) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters, each cut just after a newline
    that a non-space character follows: a byte-level BPE's pre-tokenizer splits there anyway,
    so the pieces' tokens, concatenated, are the whole text's (and are encoded in parallel)."""
    chunks, start = [], 0
    while start < len(text):
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        chunks.append(text[start:cut])
        start = cut
    return chunks


def load_data(cfg: Config, runtime: Runtime | None = None) -> Corpus:
    """The corpus of ``cfg.data`` for windows of ``model.block_size``, tokenized by
    ``data.tokenizer`` (or the tokenizer of ``model.source=hf:PATH``'s directory) if any.

    Under ``runtime`` with several ranks, a tokenized corpus is read, tokenized and cached by
    rank 0 first; the other ranks then read its cache (one tokenization, not one per rank).
    """
    d, seq_len = cfg.data, cfg.model.block_size
    path = tokenizer_path(d.tokenizer, cfg.model.source)
    if not path:
        return load_corpus(d.source, seq_len, d.val_source)
    tokenizer = load_tokenizer(path)

    def reader(source: str, key: str, held_out: bool) -> Any:
        if not source.startswith(("hf:", "text:")):
            return None  # bin: shards are tokens already
        return load_tokenized(source, seq_len, held_out, tokenizer, d.text_column, key)

    first = runtime is None or runtime.world == 1 or runtime.is_main
    if not first:
        runtime.barrier()
    corpus = load_corpus(d.source, seq_len, d.val_source, reader)
    if first and runtime is not None and runtime.world > 1:
        runtime.barrier()
    return corpus


def make_stream(
    corpus: Corpus, batch_size: int, seq_len: int, seed: int, runtime: Runtime, vocab: int
) -> BatchStream | PackedStream:
    """This group's batch stream: packed windows of its own part for an ``hf:`` corpus, seeded
    random windows otherwise."""
    if corpus.packed:
        g, G = runtime.group, runtime.groups
        return PackedStream(corpus.train, batch_size, seq_len, seed, g, G, vocab)
    return BatchStream(corpus.train, batch_size, seq_len, seed, runtime.group, vocab)


def load_tokenized(
    source: str, seq_len: int, held_out: bool, tokenizer: TextTokenizer, column: str, key: str
) -> tuple[torch.Tensor, torch.Tensor | None, int, str]:
    """(train, val, vocabulary, description) of ``text:FILE`` or ``hf:PATH`` through
    ``tokenizer``; ``held_out``: val is the last ``max(10%, seq_len + 1)`` tokens."""
    if source.startswith("hf:"):
        tokens = hf_tokens(source, tokenizer, column, key)
    else:
        path = Path(source.removeprefix("text:")).expanduser()
        if not path.is_file():
            raise DataError(f"{key}={source!r}: {path} does not exist or is not a file")
        tokens = text_tokens(path, tokenizer)
    about = f"{source} ({{}} tokens, tokenizer {tokenizer.path}, vocab {tokenizer.vocab_size})"
    if not held_out:
        return tokens, None, tokenizer.vocab_size, about.format(tokens.numel())
    train, val = hold_out(tokens, seq_len, f"{key}={source!r}")
    return train, val, tokenizer.vocab_size, about.format(f"{len(train)} train / {len(val)} val")


def _with_eos(docs: list[list[int]], eos_id: int) -> list[np.ndarray]:
    return [np.asarray([*ids, eos_id], dtype=np.int64) for ids in docs]


def _data_files(path: Path, key: str, source: str) -> list[Path]:
    """The dataset's files: a save_to_disk folder's arrow files, or the data files of PATH."""
    if path.is_file():
        if path.suffix not in _SUFFIXES:
            raise DataError(
                f"{key}={source!r}: {path.name} is not a parquet, jsonl, json or arrow file"
            )
        return [path]
    found = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
    found = [p for p in found if CACHE_DIR not in p.parts]
    if not found:
        raise DataError(
            f"{key}={source!r}: {path} holds no parquet, jsonl, json or arrow files and is not "
            "a datasets.save_to_disk folder"
        )
    return found


def _saved_to_disk(path: Path) -> bool:
    """Whether ``path`` is a ``save_to_disk`` folder (of a Dataset or a DatasetDict)."""
    return any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def _read_dataset(path: Path, files: list[Path], key: str, source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{key}={source!r} needs the datasets package: pip install -e '.[hf]'"
        ) from None
    datasets.disable_progress_bars()
    try:
        if _saved_to_disk(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                split = "train" if "train" in loaded else next(iter(loaded))
                loaded = loaded[split]
            return loaded
        kinds = {_SUFFIXES[p.suffix] for p in files}
        if len(kinds) > 1:
            raise DataError(
                f"{key}={source!r} mixes {', '.join(sorted(kinds))} files; keep one format"
            )
        cache_dir = _writable(_cache_root(path) / "datasets")
        return datasets.load_dataset(
            kinds.pop(),
            data_files=[str(p) for p in files],
            split="train",
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except DataError:
        raise
    except Exception as e:  # pyarrow and datasets raise many types for malformed files
        text = " ".join(str(e).split())[:240]
        raise DataError(f"{key}={source!r}: cannot read it ({type(e).__name__}: {text})") from None


def _cache_root(path: Path) -> Path:
    return (path if path.is_dir() else path.parent) / CACHE_DIR


def _writable(directory: Path) -> Path | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return directory if os.access(directory, os.W_OK) else None


def _cache_file(path: Path, files: list[Path], tokenizer: TextTokenizer, column: str) -> Path:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([stats, tokenizer.digest, tokenizer.eos_id, column]).encode()
    name = f"tokens-{hashlib.sha256(blob).hexdigest()[:16]}"
    return _cache_root(path) / name


def _dtype(vocab_size: int) -> tuple[np.dtype, torch.dtype]:
    if vocab_size <= 2**16:
        return np.dtype(np.uint16), torch.uint16
    return np.dtype(np.int32), torch.int32


def _read_cache(cache: Path) -> torch.Tensor | None:
    """The cached tokens, memory-mapped, or None."""
    meta_file = cache.with_suffix(".json")
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    bin_file = cache.with_suffix(".bin")
    _, dtype = _dtype(meta["vocab_size"])
    if not bin_file.is_file() or bin_file.stat().st_size != meta["bytes"]:
        return None
    return torch.from_file(str(bin_file), shared=False, size=meta["tokens"], dtype=dtype)


def _save_cache(cache: Path, tokens: np.ndarray, vocab_size: int) -> torch.Tensor:
    """Write the tokens beside the data when possible; return them as a tensor."""
    np_dtype, dtype = _dtype(vocab_size)
    data = tokens.astype(np_dtype)
    if _writable(cache.parent) is not None:
        write_atomic(cache.with_suffix(".bin"), lambda f: f.write(data.tobytes()))
        meta = {"tokens": int(data.size), "bytes": int(data.nbytes), "vocab_size": vocab_size}
        write_atomic(cache.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
    return torch.from_numpy(data.view(np.int16) if np_dtype == np.uint16 else data).view(dtype)


class PackedStream:
    """Packed windows of group ``group`` of ``groups``, reproducible and resumable (see the
    module docstring); ``next()`` gives x, y int64 [batch_size, seq_len] as ``BatchStream``."""

    packed = True  # marks its state dicts: a BatchStream's cannot be loaded into it

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        seq_len: int,
        seed: int,
        group: int,
        groups: int,
        vocab_size: int | None = None,
    ) -> None:
        windows = (tokens.numel() - 1) // seq_len
        lo, hi = group * windows // groups, (group + 1) * windows // groups
        if hi <= lo:
            raise DataError(
                f"{tokens.numel()} tokens make {windows} windows of model.block_size={seq_len}, "
                f"fewer than topology.groups={groups}; give more data or lower model.block_size"
            )
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.stream, self.groups = seed, group, groups
        self.vocab_size = vocab_size
        self.first, self.count = lo, hi - lo
        self.epoch, self.index, self.batches = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        digest = hashlib.sha256(f"diloco-packed/{self.seed}/{self.stream}/{epoch}".encode())
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little"))
        return self.first + torch.randperm(self.count, generator=generator)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks, got = [], 0
        while got < self.batch_size:
            if self.index == self.count:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - got, self.count - self.index)
            picks.append(self._order[self.index : self.index + take])
            self.index, got = self.index + take, got + take
        starts = torch.cat(picks) * self.seq_len
        windows = self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)].long()
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        self.batches += 1
        if self.vocab_size is not None:
            check_tokens(x, y, self.vocab_size, f"training batch {self.batches}")
        return x, y

    def state_dict(self) -> dict[str, Any]:
        """Exact position: (epoch, index into the epoch's order), batches drawn, and the
        settings the order depends on."""
        return {
            "packed": True,
            "seed": self.seed,
            "stream": self.stream,
            "groups": self.groups,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "epoch": self.epoch,
            "index": self.index,
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; its settings must match this stream's."""
        keys = ("packed", "seed", "stream", "groups", "batch_size", "seq_len")
        mismatched = [
            f"{k}={state.get(k)} (now {getattr(self, k)})"
            for k in keys
            if state.get(k) != getattr(self, k)
        ]
        if mismatched:
            raise CheckpointError(
                f"saved data stream has {', '.join(mismatched)}; resume with the saved "
                "settings or start a new run"
            )
        self.epoch, self.index, self.batches = state["epoch"], state["index"], state["batches"]
        self._order = self._permutation(self.epoch)
