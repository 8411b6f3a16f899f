"""Tokenizers of ``data.tokenizer``: a local Hugging Face tokenizer directory or a
``tokenizers`` JSON file, and ``diloco tokenizer train`` (a byte-level BPE on local text).

:class:`TextTokenizer` turns documents into token ids and knows the end-of-text id that
separates packed documents. A directory with a ``tokenizer.json`` (a fast tokenizer) is read with
the ``tokenizers`` library alone; any other directory (e.g. a sentencepiece model) goes through
``transformers.AutoTokenizer``. Nothing is downloaded. The libraries are imported only here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diloco.errors import ConfigError, DataError

__all__ = ["EOS_TOKEN", "TextTokenizer", "load_tokenizer", "tokenizer_path", "train_tokenizer"]

#: The end-of-text token ``diloco tokenizer train`` adds (id 0), as GPT-2's.
EOS_TOKEN = "<|endoftext|>"
_EOS_GUESSES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
_HF_MISSING = "{key}={value!r} needs the tokenizers package: pip install -e '.[hf]'"


@dataclass(frozen=True)
class TextTokenizer:
    """A loaded tokenizer: ``encode(texts) -> ids per text`` (no special tokens added),
    ``eos_id`` (the document separator), ``vocab_size`` (ids are ``< vocab_size``), ``digest``
    (a hash of its definition, for caches) and where it came from (``path``)."""

    encode: Callable[[Sequence[str]], list[list[int]]]
    eos_id: int
    vocab_size: int
    digest: str
    path: Path


def tokenizer_path(tokenizer: str, model_source: str) -> str:
    """``data.tokenizer``, or else the model directory of ``model.source=hf:PATH`` when it holds
    a tokenizer, or ``""`` (byte tokens)."""
    if tokenizer:
        return tokenizer
    if model_source.startswith("hf:"):
        directory = Path(model_source.removeprefix("hf:")).expanduser()
        if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return str(directory)
    return ""


def load_tokenizer(path_text: str, key: str = "data.tokenizer") -> TextTokenizer:
    """The tokenizer at ``path_text`` (a directory or a ``tokenizers`` JSON file).

    Raises:
        ConfigError: a missing path or package, a file the library cannot read, or no
            end-of-text token.
    """
    path = Path(path_text).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{key}={path_text!r} does not exist; give a tokenizer directory or tokenizer.json "
            "(diloco tokenizer train --data text:FILE --vocab N --out DIR makes one)"
        )
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        return _fast_tokenizer(file, path, key, path_text)
    return _auto_tokenizer(path, key, path_text)


def _fast_tokenizer(file: Path, path: Path, key: str, value: str) -> TextTokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(_HF_MISSING.format(key=key, value=value)) from None
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the library raises a bare Exception for a malformed file
        raise ConfigError(
            f"{key}={value!r}: {file} is not a tokenizers JSON file ({_line(e)})"
        ) from None
    eos = _configured_eos(path) if path.is_dir() else None
    eos_id = _eos_id(tok.token_to_id, eos, key, value)

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return TextTokenizer(encode, eos_id, tok.get_vocab_size(with_added_tokens=True), digest, path)


def _auto_tokenizer(path: Path, key: str, value: str) -> TextTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(_HF_MISSING.format(key=key, value=value)) from None
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{key}={value!r}: transformers cannot load a tokenizer from {path} ({_line(e)})"
        ) from None
    eos_id = tok.eos_token_id
    if eos_id is None:
        eos_id = _eos_id(tok.convert_tokens_to_ids, None, key, value)

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return tok(list(texts), add_special_tokens=False)["input_ids"]

    files = sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]
    return TextTokenizer(encode, int(eos_id), len(tok), digest, path)


def _configured_eos(directory: Path) -> str | None:
    """The ``eos_token`` of a directory's ``tokenizer_config.json``, if any."""
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos: Any = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _eos_id(lookup: Callable[[str], Any], eos: str | None, key: str, value: str) -> int:
    """The id of ``eos``, or of the first common end-of-text token the vocabulary has."""
    for token in (eos,) if eos else _EOS_GUESSES:
        token_id = lookup(token)
        if isinstance(token_id, int) and token_id >= 0:
            return token_id
    raise ConfigError(
        f"{key}={value!r} has no end-of-text token (tried {eos or ', '.join(_EOS_GUESSES)}) to "
        "separate documents; set eos_token in its tokenizer_config.json"
    )


def train_tokenizer(data: str, vocab: int, out: str) -> dict[str, Any]:
    """Train a byte-level BPE of ``vocab`` tokens on ``text:FILE`` (offline) and save it to
    directory ``out`` (``tokenizer.json`` and ``tokenizer_config.json``, loadable by
    ``AutoTokenizer`` and ``data.tokenizer``). ``<|endoftext|>`` is id 0.

    Raises:
        DataError: ``data`` is not ``text:FILE`` of readable UTF-8 text.
        ConfigError: ``vocab`` outside [257, 2**20] or ``out`` a file.
    """
    if not data.startswith("text:"):
        raise DataError(f"--data {data!r} must be text:FILE (a UTF-8 text file)")
    path = Path(data.removeprefix("text:")).expanduser()
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"--data {data!r}: {path} is not a non-empty file; fix the path")
    if not 257 <= vocab <= 2**20:
        raise ConfigError(
            f"--vocab must be in [257, 1048576] (256 bytes, EOS, merges), got {vocab}"
        )
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out}: {out_dir} is a file; give a directory")
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ConfigError(_HF_MISSING.format(key="--data", value=data)) from None
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--data {data!r} is not valid UTF-8 (byte {e.start})") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(path)], trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "model_max_length": 1_000_000_000,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return {"vocab": tok.get_vocab_size(), "out": str(out_dir), "data": str(path)}


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:240]
