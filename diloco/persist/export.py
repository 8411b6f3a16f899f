"""``diloco export``: θ of a checkpoint as one plain, unsharded ``GPT`` state dict.

The checkpoint's slow weights (``outer/``, full-shape DCP tensors, whatever S wrote them) are
read in this one process, loaded into a ``GPT`` of the checkpoint's model config and written as
its ``state_dict()``: fp32, on the CPU, with the tied ``lm_head.weight`` stored as its own copy
(safetensors refuses shared storage). Loading is one line::

    GPT(GPTConfig(...)).load_state_dict(safetensors.torch.load_file("model.safetensors"))
    GPT(GPTConfig(...)).load_state_dict(torch.load("model.pt"))

The model config is also stored in the safetensors metadata (``diloco_model``, JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from diloco.errors import CheckpointError, DilocoError
from diloco.files import write_atomic
from diloco.persist.checkpoint_files import load_dcp
from diloco.persist.resume import CHECKPOINTS, config_of, newest_checkpoint, read_meta

__all__ = ["export", "find_checkpoint", "load_theta"]

_SUFFIXES = (".safetensors", ".pt")


def export(run_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write θ of the newest checkpoint of ``run_dir`` (or of checkpoint ``run_dir``) to ``out``.

    Returns ``{"checkpoint", "step", "params", "out"}``.

    Raises:
        DilocoError: unknown output suffix, or safetensors missing for ``.safetensors``.
        CheckpointError: no (loadable) checkpoint.
    """
    out = Path(out)
    if out.suffix not in _SUFFIXES:
        raise DilocoError(f"--out {out}: the file name must end in .safetensors or .pt")
    if out.suffix == ".safetensors":
        try:
            from safetensors.torch import save as to_bytes
        except ImportError:
            raise DilocoError(
                "writing .safetensors needs the safetensors package (pip install safetensors); "
                "or use --out model.pt"
            ) from None
    ckpt, meta = find_checkpoint(Path(run_dir))
    state = gpt_state_dict(ckpt, meta)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DilocoError(f"cannot write {out}: {e.strerror or e}") from None
    if out.suffix == ".safetensors":
        cfg = config_of(meta)
        info = {"diloco_model": json.dumps(dataclasses.asdict(cfg.model))}
        info["diloco_step"] = str(meta["step"])
        write_atomic(out, lambda f: f.write(to_bytes(state, metadata=info)))
    else:
        write_atomic(out, lambda f: torch.save(state, f))
    params = sum(t.numel() for k, t in state.items() if k != "lm_head.weight")
    return {"checkpoint": str(ckpt), "step": meta["step"], "params": params, "out": str(out)}


def find_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, its meta) of checkpoint ``path``, or of the newest one in run ``path``."""
    if (path / "meta.json").exists():
        return path, read_meta(path)
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist")
    found = newest_checkpoint(path, announce=True)
    if found is None:
        raise CheckpointError(
            f"{path} holds no checkpoint ({path / CHECKPOINTS} is empty or missing); "
            "train with train.checkpoint_every > 0"
        )
    return found


def load_theta(ckpt: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """θ of checkpoint ``ckpt`` as full tensors ``{fqn: tensor}`` (one process, no group)."""
    from torch.distributed.checkpoint import FileSystemReader

    # outer.method=none has no θ: the weights are the model's, saved with group 0.
    part, prefix = ("group0", "model.") if meta.get("method") == "none" else ("outer", "slow.")
    path = ckpt / part
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a missing or corrupt .metadata file, whatever DCP raises for it
        text = " ".join(str(e).split())[:300]
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {text}") from None
    theta = {
        key[len(prefix) :]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(md, "size")
    }
    load_dcp({prefix[:-1]: theta}, path)
    return theta


def gpt_state_dict(ckpt: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A ``GPT.state_dict()`` holding θ of checkpoint ``ckpt``; no tensors share storage."""
    from diloco.models import GPT, GPTConfig

    cfg = config_of(meta)
    if cfg.model.source != "gpt":
        raise DilocoError(
            f"{ckpt} trained model.source={cfg.model.source!r}; export it with --format hf "
            "--out DIR (a Hugging Face model directory)"
        )
    model = GPT(GPTConfig(**dataclasses.asdict(cfg.model)))
    missing, unexpected = model.load_state_dict(load_theta(ckpt, meta), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit its own model config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
