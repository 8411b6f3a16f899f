"""``diloco export RUN --format hf --out DIR``: θ of a Hugging Face model's run, as a model
directory that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads.

The checkpoint's slow weights (``hf.<name>`` in the run, see :class:`diloco.models.hf.HFCausalLM`)
are loaded into a model built from the run's ``config.json`` and written with
``save_pretrained`` (``config.json``, ``generation_config.json``, safetensors; tied weights stored
once, as the library does), with the run's tokenizer beside them when it had one
(``data.tokenizer``, or the model directory's). DIR is written whole or not at all: everything
goes into ``DIR.tmp-<pid>``, renamed to DIR at the end.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from diloco.errors import CheckpointError, DilocoError
from diloco.persist.export import find_checkpoint, load_theta
from diloco.persist.resume import config_of

__all__ = ["export_hf"]

PREFIX = "hf."


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write θ of the newest checkpoint of ``run_dir`` (or of checkpoint ``run_dir``) as a
    Hugging Face model directory ``out``; returns ``{"checkpoint", "step", "params", "out",
    "tokenizer"}``.

    Raises:
        DilocoError: ``out`` exists and is not empty, or the run trained the built-in GPT.
        CheckpointError: no (loadable) checkpoint, or θ does not fit the model.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DilocoError(f"--out {out} exists and is not an empty directory; choose a new one")
    ckpt, meta = find_checkpoint(Path(run_dir))
    cfg = config_of(meta)
    if not cfg.model.source.startswith("hf:"):
        raise DilocoError(
            f"--format hf needs a run with model.source=hf:PATH; {ckpt} trained the built-in "
            "GPT (model.source=gpt): export it with --out FILE.safetensors"
        )
    from diloco.job.tokenizer import tokenizer_path
    from diloco.models.hf import hf_model, import_transformers

    transformers = import_transformers(cfg.model.source)
    transformers.utils.logging.disable_progress_bar()
    model = hf_model(cfg.model.source)
    theta = {k.removeprefix(PREFIX): v for k, v in load_theta(ckpt, meta).items()}
    missing, unexpected = model.load_state_dict(theta, strict=False)
    tied = {k for k in missing if _tied_to_loaded(model, k, theta)}
    if unexpected or set(missing) - tied:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit the model of {cfg.model.source} "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    tokenizer = tokenizer_path(cfg.data.tokenizer, cfg.model.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        if tokenizer:
            _save_tokenizer(transformers, Path(tokenizer).expanduser(), tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = sum(t.numel() for t in theta.values())
    return {
        "checkpoint": str(ckpt),
        "step": meta["step"],
        "params": params,
        "out": str(out),
        "tokenizer": tokenizer,
    }


def _tied_to_loaded(model: torch.nn.Module, name: str, loaded: dict[str, Any]) -> bool:
    """Whether parameter ``name`` is the same tensor as one that was loaded (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(
        params.get(k) is target for k in loaded if k != name and k in params
    )


def _save_tokenizer(transformers: Any, path: Path, out: Path) -> None:
    """The run's tokenizer into ``out``: a directory through ``AutoTokenizer``, a ``tokenizers``
    JSON file as a fast tokenizer with its end-of-text token."""
    if path.is_dir():
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        from diloco.job.tokenizer import load_tokenizer

        loaded = load_tokenizer(str(path))
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        tok.eos_token = tok.convert_ids_to_tokens(loaded.eos_id)
    tok.save_pretrained(out)
