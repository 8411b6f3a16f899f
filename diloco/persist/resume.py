"""Finding the checkpoint a run continues from, and checking it fits the run.

A checkpoint is ``RUN_DIR/checkpoints/step_<N>/`` (layout: :mod:`diloco.persist.checkpoint`). It is
*loadable* when its ``meta.json`` is complete, of this format version, and every file of its
manifest is there with its recorded size. ``--resume auto`` takes the newest loadable one,
skipping broken ones with a warning; an explicit path must be loadable. The model shapes must
match; the config must match too (:data:`RESUME_IGNORE` aside: run length, logging, checkpoint
cadence, torch.compile, G, S, device), unless ``--force``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from diloco.config import (
    FINGERPRINT_IGNORE,
    Config,
    config_fingerprint,
    config_from_dict,
    config_to_dict,
)
from diloco.errors import CheckpointError, DilocoError, note, warn
from diloco.persist.checkpoint_files import one_line

__all__ = [
    "CHECKPOINTS",
    "FORMAT_VERSION",
    "RESUME_IGNORE",
    "check_compatible",
    "config_of",
    "list_checkpoints",
    "model_shapes",
    "newest_checkpoint",
    "plan_resume",
    "read_meta",
]

CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1
#: Settings that may change between save and resume without ``--force``.
RESUME_IGNORE: tuple[str, ...] = FINGERPRINT_IGNORE + (
    "train.compile",
    "topology.groups",
    "topology.shards",
    "topology.backend",
)
STEP_DIR = re.compile(r"step_(\d+)")


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``RUN_DIR/checkpoints/step_<N>`` directories, newest (largest N) first; ``.tmp`` excluded."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_meta(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of checkpoint directory ``ckpt`` after checking the checkpoint is whole.

    Raises:
        CheckpointError: missing or unreadable meta.json, not marked complete, another format
            version, or a file missing or of the wrong size (truncated) per the manifest.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist or is not a directory")
    path = ckpt / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {ckpt} has no meta.json; it was not completely written"
        ) from None
    except (OSError, UnicodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {ckpt}: meta.json is unreadable ({one_line(e)})"
        ) from None
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        raise CheckpointError(f"checkpoint {ckpt} is not marked complete in meta.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt} has format version {meta.get('format_version')!r}; "
            f"this diloco reads version {FORMAT_VERSION}"
        )
    for rel, size in meta.get("files", {}).items():
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {rel}; it is incomplete")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint {ckpt}: {rel} is {actual} bytes, expected {size}; "
                "the file is truncated or corrupt"
            )
    return meta


def newest_checkpoint(
    run_dir: str | os.PathLike, announce: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint of ``run_dir`` and its meta, or None if there is none.

    Broken checkpoints are skipped with a warning (if ``announce``). Raises CheckpointError
    when checkpoints exist but none is loadable.
    """
    problems = []
    for ckpt in list_checkpoints(run_dir):
        try:
            meta = read_meta(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            warn(f"{e}; skipping it and trying the previous checkpoint", announce)
            continue
        return ckpt, meta
    if problems:
        raise CheckpointError(
            f"no loadable checkpoint in {Path(run_dir) / CHECKPOINTS} ({problems[0]}); "
            "remove the broken checkpoints or start over with --resume never --force"
        )
    return None


def plan_resume(
    cfg: Config, resume: str | None = None, force: bool = False, is_main: bool = True
) -> Path | None:
    """Which checkpoint this run continues from (None: start at step 0); reads, never writes.

    ``resume``: None (auto if the run directory holds a checkpoint, else a fresh start),
    ``"auto"``, ``"never"``, or the path of a checkpoint (``…/step_<N>``) or of a run directory.
    Every rank calls this and takes the same decision from the same files.

    Raises:
        CheckpointError: the checkpoint is missing, broken, or from another model shape; the
            config differs (unless ``force``); ``never`` into a directory with checkpoints
            (unless ``force``: the old ``checkpoints/`` is then set aside by rank 0).
    """
    run_dir = Path(cfg.run.out_dir)
    if resume == "never":
        if force:
            if is_main and (run_dir / CHECKPOINTS).is_dir():
                aside = run_dir / f"{CHECKPOINTS}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                (run_dir / CHECKPOINTS).rename(aside)
                warn(f"--resume never --force: moved the old checkpoints to {aside}")
            return None
        existing = list_checkpoints(run_dir)
        if existing:
            raise CheckpointError(
                f"run directory {run_dir} already holds checkpoints (newest {existing[0].name}); "
                "resume with --resume auto, choose another run.out_dir, or add --force to "
                "start over"
            )
        return None
    if resume in (None, "auto"):
        found = newest_checkpoint(run_dir, announce=is_main)
        if found is None:
            if resume == "auto":
                note(f"no checkpoint in {run_dir / CHECKPOINTS}; starting at step 0", is_main)
            return None
        ckpt, meta = found
    else:
        ckpt, meta = _explicit_checkpoint(Path(resume))
    check_compatible(cfg, ckpt, meta, force, is_main)
    return ckpt


def _explicit_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    if (path / "meta.json").exists() or STEP_DIR.fullmatch(path.name):
        return path, read_meta(path)
    if (path / CHECKPOINTS).is_dir():
        found = newest_checkpoint(path)
        if found is not None:
            return found
    raise CheckpointError(
        f"--resume {path}: no checkpoint there; give a checkpoint directory "
        f"(…/{CHECKPOINTS}/step_<N>) or a run directory that holds {CHECKPOINTS}/"
    )


def check_compatible(
    cfg: Config, ckpt: Path, meta: dict[str, Any], force: bool, is_main: bool = True
) -> None:
    """Refuse a checkpoint of another model shape, or (unless ``force``) another config."""
    shapes = model_shapes(cfg)
    saved = meta.get("model_shapes", {})
    if saved != shapes:
        raise CheckpointError(
            f"checkpoint {ckpt} is from a different model shape ({_shape_diff(saved, shapes)}); "
            "resume with its model.* settings or start a new run"
        )
    if meta.get("config_fingerprint") != config_fingerprint(cfg, RESUME_IGNORE):
        changes = _config_diff(meta.get("config", {}), config_to_dict(cfg))
        if not force:
            raise CheckpointError(
                f"checkpoint {ckpt} was written with a different config ({changes}); resume "
                "with the same settings, add --force to resume anyway, or choose a new "
                "run.out_dir"
            )
        warn(f"--force: resuming {ckpt} with a changed config ({changes})", is_main)
    if meta["step"] > cfg.train.steps:
        raise CheckpointError(
            f"checkpoint {ckpt} is at step {meta['step']}, beyond train.steps={cfg.train.steps}; "
            f"set train.steps >= {meta['step']} to resume it"
        )
    saved_g, saved_s = meta["groups"], meta["shards"]
    G, S = cfg.topology.groups, cfg.topology.shards
    if G != saved_g:
        if G > saved_g:
            how = (
                f"new groups {saved_g}..{G - 1} start from a copy of group (g mod {saved_g})'s "
                "inner optimiser state and fresh data streams"
            )
        else:
            how = f"the inner states and data positions of groups {G}..{saved_g - 1} are dropped"
        warn(
            f"checkpoint {ckpt} has {saved_g} groups, this run has {G}: {how}; "
            "RNG streams are re-seeded",
            is_main,
        )
    elif S != saved_s:
        note(f"resharding checkpoint {ckpt} from {saved_s} to {S} shards per group", is_main)


def model_shapes(cfg: Config) -> dict[str, list[int]]:
    """``{fqn: shape}`` of the trainable parameters of ``cfg.model``'s model (built on meta)."""
    from diloco.models.build import meta_model

    model = meta_model(cfg.model)
    return {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _shape_diff(saved: dict[str, list[int]], current: dict[str, list[int]]) -> str:
    for name, shape in current.items():
        if name not in saved:
            return f"{name} is not in the checkpoint"
        if saved[name] != shape:
            return f"{name} is {saved[name]} there, {shape} here"
    extra = sorted(set(saved) - set(current))
    return f"{extra[0]} is only in the checkpoint" if extra else "parameters differ"


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, values in config.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def _config_diff(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """``key saved -> current`` for every setting that matters on resume, comma-separated."""
    old, new = _flatten(saved), _flatten(current)
    changed = [
        f"{key} {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        for key in sorted(set(old) | set(new))
        if key not in RESUME_IGNORE and old.get(key) != new.get(key)
    ]
    return ", ".join(changed) or "fingerprint differs"


def config_of(meta: dict[str, Any]) -> Config:
    """The run config stored in a checkpoint's meta."""
    try:
        return config_from_dict(meta["config"])
    except (KeyError, DilocoError) as e:
        raise CheckpointError(f"checkpoint config is unusable: {e}") from None
