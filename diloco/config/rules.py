"""Config validation: each key's allowed range, and the rules between keys.

:func:`validate` raises :class:`~diloco.errors.ConfigError` for the first value out of range
or inconsistent with another, with one line naming the key(s), the value and the fix. Like
:mod:`diloco.config`, this module must not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diloco.errors import ConfigError

if TYPE_CHECKING:
    from diloco.config.schema import Config, InnerConfig, OuterConfig

__all__ = ["DEEPSPEED_RESERVED", "shown", "validate"]


def shown(value: Any) -> str:
    """``value`` with its type, as in ``'abc' (str)``."""
    return f"{value!r} ({type(value).__name__})"


#: A key's allowed range: the range as the message states it when ``value`` is outside, or None.
_Bound = Callable[[Any], "str | None"]


def _at_least(low: int, note: str = "", high: int | None = None, why: str = "") -> _Bound:
    """Allow ``low <= value`` (and ``value <= high``: a size that could not be allocated)."""

    def outside(value: Any) -> str | None:
        if value < low:
            return f">= {low}{note}"
        if high is not None and value > high:
            return f"<= {high}{why}"
        return None

    return outside


def _inside(allowed: Callable[[Any], bool], text: str) -> _Bound:
    return lambda value: None if allowed(value) else text


_POSITIVE = _inside(lambda v: v > 0, "> 0")
_FRACTION = _inside(lambda v: 0 <= v < 1, "in [0, 1)")
_CLOSED_FRACTION = _inside(lambda v: 0 <= v <= 1, "in [0, 1]")
_SIZE = 2**20  # the largest batch, sequence or vocabulary a run may ask for (about a million)

#: One rule per key: the allowed range of its value. Size-like keys (they size allocations)
#: have an upper limit too; :mod:`diloco.job.preflight` then checks the memory they add up to.
_BOUNDS: dict[str, _Bound] = {
    "run.seed": _at_least(0, high=2**32 - 1),
    "model.vocab_size": _at_least(2, high=_SIZE),
    "model.block_size": _at_least(1, high=_SIZE),
    "model.n_layer": _at_least(1, high=1024),
    "model.n_head": _at_least(1, high=1024),
    "model.n_embd": _at_least(1, high=65536),
    "model.dropout": _FRACTION,
    "data.batch_size": _at_least(1, high=_SIZE),
    "inner.lr": _POSITIVE,
    "inner.weight_decay": _at_least(0),
    "inner.eps": _POSITIVE,
    "inner.momentum": _FRACTION,
    "inner.muon_lr": _POSITIVE,
    "inner.warmup_steps": _at_least(0),
    "inner.min_lr_ratio": _CLOSED_FRACTION,
    "inner.decay_frac": _CLOSED_FRACTION,
    "inner.grad_clip": _at_least(0, " (0 disables clipping)"),
    "outer.sync_every": _at_least(1),
    "outer.lr": _POSITIVE,
    "outer.momentum": _FRACTION,
    "outer.ema_beta": _FRACTION,
    "outer.ema_gamma": _FRACTION,
    "outer.ema_warmup": _FRACTION,
    "outer.ema_rest": _FRACTION,
    "outer.compress_block": _at_least(
        8, high=65536, why=" (one fp32 scale per block already costs under 0.01%)"
    ),
    "outer.fragments": _at_least(1),
    "outer.sync_delay": _at_least(0),
    "outer.mix_alpha": _CLOSED_FRACTION,
    "train.steps": _at_least(1),
    "train.eval_every": _at_least(0, " (0 = only the final evaluation)"),
    "train.eval_batches": _at_least(1, high=100_000),
    "train.log_every": _at_least(1),
    "train.checkpoint_every": _at_least(0, " (0 = no checkpoints)"),
    "train.keep_last": _at_least(1),
    "train.max_bad_rounds": _at_least(1),
    "train.check_every": _at_least(1),
    "topology.groups": _at_least(1, high=65536),
    "topology.shards": _at_least(1, high=65536),
    "topology.timeout_s": _at_least(1, high=7 * 86400, why=" (a week)"),
    "topology.min_groups": _at_least(1),
    "topology.heartbeat_timeout_s": _POSITIVE,
    "topology.join_timeout_s": _at_least(0),
    "topology.quorum_timeout_s": _POSITIVE,
}

#: Outer-loop features that need an outer step, with their "off" values.
_STREAMING_DEFAULTS: dict[str, Any] = {
    "compress": "none",
    "fragments": 1,
    "sync_delay": 0,
    "mix_alpha": 0.0,
}


def _check(ok: bool, message: str) -> None:
    """Raise ConfigError(``message``) unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first value out of range or inconsistent with another."""
    for dotted, outside in _BOUNDS.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        allowed = outside(value)
        _check(allowed is None, f"{dotted} must be {allowed}, got {value!r}")
    run, model, data, inner = cfg.run, cfg.model, cfg.data, cfg.inner
    outer, train, topology = cfg.outer, cfg.train, cfg.topology

    _check(bool(run.out_dir.strip()), f"run.out_dir must be a non-empty path, got {run.out_dir!r}")
    _check(
        model.n_embd % model.n_head == 0,
        f"model.n_embd ({model.n_embd}) must be divisible by model.n_head ({model.n_head}): "
        f"each head gets n_embd / n_head dimensions",
    )
    kind, _, target = model.source.partition(":")
    _check(
        model.source == "gpt" or (kind == "hf" and bool(target.strip())),
        f"model.source must be gpt or hf:<path of a local model directory>, got {model.source!r}",
    )
    kind, _, target = data.source.partition(":")
    _check(
        data.source == "embedded" or (kind in ("text", "bin", "hf") and bool(target.strip())),
        f"data.source must be embedded, text:<path>, bin:<glob> or hf:<path>, got {data.source!r}",
    )
    kind, _, target = data.val_source.partition(":")
    _check(
        data.val_source in ("auto", "heldout")
        or (kind in ("text", "bin", "hf") and bool(target.strip())),
        "data.val_source must be auto, heldout, text:<path>, bin:<glob> or hf:<path>, "
        f"got {data.val_source!r}",
    )
    _check(
        bool(data.text_column.strip()),
        f"data.text_column must name a column, got {data.text_column!r}",
    )
    _check(
        not (data.tokenizer and data.source == "embedded"),
        f"data.tokenizer={data.tokenizer!r} with data.source=embedded (byte tokens); the "
        "tokenizer applies to text:, bin: and hf: sources: set data.source or unset data.tokenizer",
    )
    tokenized = data.tokenizer or model.source != "gpt"
    for key, value in (("data.source", data.source), ("data.val_source", data.val_source)):
        _check(
            not value.startswith("hf:") or bool(tokenized),
            f"{key}={value!r} needs a tokenizer for its text; set data.tokenizer=PATH (a "
            "tokenizer directory or JSON file; diloco tokenizer train makes one)",
        )
    _check(
        data.batch_size % topology.shards == 0,
        f"data.batch_size ({data.batch_size}) must be divisible by topology.shards "
        f"({topology.shards}): the group batch is split across the shards; "
        f"e.g. data.batch_size={topology.shards * math.ceil(data.batch_size / topology.shards)}",
    )
    _check(
        topology.mixed_precision != "fp64" or inner.engine != "deepspeed",
        "topology.mixed_precision=fp64 with inner.engine=deepspeed: the DeepSpeed engine trains "
        "in fp32 or bf16 only; use topology.mixed_precision=fp32 or inner.engine=fsdp2",
    )
    _check(
        inner.optimizer != "muon" or topology.shards == 1,
        f"inner.optimizer=muon with topology.shards={topology.shards}: Muon orthogonalises whole "
        f"weight matrices but each FSDP2 shard holds a slice of rows; use topology.shards=1 "
        f"(scale out with topology.groups) or inner.optimizer=adamw",
    )
    _check(
        len(inner.betas) == 2,
        f"inner.betas must be two numbers [beta1, beta2], got {inner.betas!r}",
    )
    _check(
        all(0 <= beta < 1 for beta in inner.betas),
        f"inner.betas must each be in [0, 1), got {inner.betas!r}",
    )
    _check(
        inner.warmup_steps < train.steps,
        f"inner.warmup_steps ({inner.warmup_steps}) must be < train.steps ({train.steps})",
    )
    _check(
        outer.ema_warmup + outer.ema_rest < 1,
        f"outer.ema_warmup + outer.ema_rest must be < 1 so that some steps use beta > 0, "
        f"got {outer.ema_warmup} + {outer.ema_rest}",
    )
    _check(
        model.source != "gpt" or outer.fragments <= model.n_layer,
        f"outer.fragments ({outer.fragments}) must be <= model.n_layer ({model.n_layer}): "
        f"each fragment holds at least one layer",
    )
    _check(
        outer.sync_delay < outer.sync_every,
        f"outer.sync_delay ({outer.sync_delay}) must be < outer.sync_every ({outer.sync_every})",
    )
    # Streaming (diloco/algorithm/fragments.py): fragment i is applied at step offset (i+1)·K/P,
    # so K/P must be whole, and a reduction started τ steps earlier must land before the next starts
    # (then none is in flight at a round boundary, where checkpoints are taken).
    _check(
        outer.sync_every % outer.fragments == 0,
        f"outer.sync_every ({outer.sync_every}) must be divisible by outer.fragments "
        f"({outer.fragments}): fragment i syncs at offset (i+1)*sync_every/fragments; e.g. "
        f"outer.sync_every={outer.fragments * math.ceil(outer.sync_every / outer.fragments)}",
    )
    _check(
        outer.sync_delay < outer.sync_every // outer.fragments,
        f"outer.sync_delay ({outer.sync_delay}) must be < outer.sync_every / outer.fragments "
        f"({outer.sync_every // outer.fragments}): a fragment's reduction must land before the "
        f"next fragment's starts",
    )
    if outer.method == "none":
        _check(
            topology.groups == 1,
            f"outer.method=none with topology.groups={topology.groups}: without an outer step "
            f"the groups never synchronise; use outer.method=nesterov or sgd, or topology.groups=1",
        )
        for key, off in _STREAMING_DEFAULTS.items():
            value = getattr(outer, key)
            _check(
                value == off,
                f"outer.{key}={value!r} needs an outer step but outer.method is none; "
                f"use outer.method=nesterov, sgd or ema_nesterov, or outer.{key}={off!r}",
            )
    _validate_engine(inner, outer)
    _validate_elastic(cfg)


#: DeepSpeed config keys diloco sets itself, with the settings they come from.
DEEPSPEED_RESERVED: dict[str, str] = {
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size / topology.shards",
    "gradient_accumulation_steps": "one inner step per batch",
    "optimizer": "inner.optimizer and its settings",
    "scheduler": "inner.schedule and its settings",
    "gradient_clipping": "inner.grad_clip",
    "zero_allow_untested_optimizer": "the inner optimiser diloco builds",
    "zero_optimization.stage": "inner.zero_stage",
}


def _validate_engine(inner: InnerConfig, outer: OuterConfig) -> None:
    """Rules of ``inner.engine``, ``inner.zero_stage`` and ``inner.deepspeed``.

    Whether the deepspeed package is installed is checked when the engine is built, so that
    a DeepSpeed config can be loaded and checked on a machine without it.
    """
    _check(
        inner.zero_stage in (1, 2, 3),
        f"inner.zero_stage must be one of 1, 2, 3, got {inner.zero_stage!r}",
    )
    if inner.engine != "deepspeed":
        _check(
            not inner.deepspeed,
            f"inner.deepspeed is set but inner.engine is {inner.engine}; "
            "use inner.engine=deepspeed or remove inner.deepspeed",
        )
        return
    _check(
        inner.optimizer != "muon",
        "inner.optimizer=muon is not supported with inner.engine=deepspeed (ZeRO flattens the "
        "weight matrices Muon needs whole); use inner.optimizer=adamw or sgd, or "
        "inner.engine=fsdp2",
    )
    for key, off in _STREAMING_DEFAULTS.items():
        _check(
            key == "compress" or getattr(outer, key) == off,
            f"outer.{key}={getattr(outer, key)!r} (streaming) is not supported with "
            f"inner.engine=deepspeed: its fast weights are flat ZeRO partitions, not layers; "
            f"use outer.{key}={off!r} or inner.engine=fsdp2",
        )
    zero = inner.deepspeed.get("zero_optimization", {})
    _check(
        isinstance(zero, dict),
        f"inner.deepspeed.zero_optimization must be a mapping, got {shown(zero)}",
    )
    for dotted, source in DEEPSPEED_RESERVED.items():
        section, _, key = dotted.rpartition(".")
        where = zero if section else inner.deepspeed
        _check(
            key not in where,
            f"inner.deepspeed.{dotted} is set by diloco (from {source}); remove it from "
            "inner.deepspeed",
        )


def _validate_elastic(cfg: Config) -> None:
    """Rules of the elastic worker groups (``topology.elastic`` and its keys)."""
    topology, outer = cfg.topology, cfg.outer
    if not topology.elastic:
        for key, unset in (("group_id", -1), ("coordinator", "")):
            value = getattr(topology, key)
            _check(
                value == unset,
                f"topology.{key}={value!r} is set but topology.elastic is false; set "
                f"topology.elastic=true or remove topology.{key}",
            )
        return
    G = topology.groups
    _check(
        topology.group_id != -1,
        f"topology.elastic=true needs topology.group_id, this group's id in 0..{G - 1} "
        "(diloco launch local --elastic sets it; on a cluster pass --set topology.group_id=g)",
    )
    _check(
        0 <= topology.group_id < G,
        f"topology.group_id={topology.group_id} must be in 0..{G - 1} with topology.elastic=true "
        f"and topology.groups={G}: give each group its own id (diloco launch local --elastic "
        "sets it)",
    )
    host, sep, port = topology.coordinator.rpartition(":")
    _check(
        bool(sep and host.strip("[]") and port.isdigit() and 0 < int(port) < 65535),
        f"topology.coordinator={topology.coordinator!r} must be HOST:PORT of the coordinator "
        "(e.g. 10.0.0.1:29510, started with 'diloco coordinator --bind HOST:PORT'; "
        "diloco launch local --elastic sets it)",
    )
    _check(
        topology.min_groups <= G,
        f"topology.min_groups ({topology.min_groups}) must be <= topology.groups ({G})",
    )
    _check(
        topology.quorum_timeout_s > topology.heartbeat_timeout_s,
        f"topology.quorum_timeout_s ({topology.quorum_timeout_s:g}) must be > "
        f"topology.heartbeat_timeout_s ({topology.heartbeat_timeout_s:g}): a round must be able "
        "to wait until a dead group is dropped",
    )
    for key, off in _STREAMING_DEFAULTS.items():
        _check(
            key == "compress" or getattr(outer, key) == off,
            f"outer.{key}={getattr(outer, key)!r} (streaming) is not supported with "
            f"topology.elastic=true: fragments are averaged at staggered steps, overlapped with "
            f"inner steps, so a group joining mid-round would need part of the model healed "
            f"mid-flight (docs/elastic.md); use outer.{key}={off!r}",
        )
    _check(
        cfg.inner.engine != "deepspeed",
        "inner.engine=deepspeed is not supported with topology.elastic=true yet (healing sends "
        "FSDP2 shards; ZeRO partitions are not wired in); use inner.engine=fsdp2",
    )
    _check(
        outer.method != "none",
        "outer.method=none with topology.elastic=true: without an outer step the groups never "
        "meet; use outer.method=nesterov, sgd or ema_nesterov",
    )
