"""Typed run configuration: defaults, YAML loading, ``--set`` overrides and validation.

A config has one section per concern (``run``, ``model``, ``data``, ``inner``, ``outer``,
``train``, ``topology``). The defaults below describe the tiny CPU SNOO run; the outer loop's
come from :mod:`diloco.config.defaults`, shared with :class:`diloco.DiLoCo`. :func:`load_config`
starts from them, deep-merges a YAML file and ``--set section.key=value`` overrides, then
validates (:mod:`diloco.config.rules`): the first problem raises
:class:`~diloco.errors.ConfigError` with one line naming the key, the value and what is allowed.
Each field's ``metadata["doc"]`` is its reference text (see :func:`config_reference`);
``metadata["choices"]`` lists the allowed values of an enum field.

This module must not import torch: configs are loaded and checked before any heavy import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diloco.config import defaults
from diloco.config.rules import shown, validate
from diloco.config.values import as_float, hint_of, override_value, read_yaml, yaml_surprise
from diloco.errors import ConfigError
from diloco.files import write_text_atomic

__all__ = [
    "FINGERPRINT_IGNORE",
    "Config",
    "DataConfig",
    "InnerConfig",
    "ModelConfig",
    "OuterConfig",
    "RunConfig",
    "TopologyConfig",
    "TrainConfig",
    "config_fingerprint",
    "config_from_dict",
    "config_reference",
    "config_to_dict",
    "dump_config",
    "load_config",
]


def _field(default: Any, doc: str, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field carrying its reference text and, for an enum, its allowed values."""
    metadata = {"doc": doc, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Where a run writes its outputs and how it reports progress."""

    out_dir: str = _field("runs/default", "Run directory: resolved config, metrics, checkpoints.")
    seed: int = _field(0, "Seed for model initialisation and data order.")
    device: str = _field(
        "auto",
        "Device to train on; auto picks CUDA when available, else CPU.",
        ("auto", "cpu", "cuda"),
    )
    progress: bool = _field(True, "Show a progress bar.")
    tensorboard: bool = _field(False, "Also write TensorBoard event files to the run directory.")
    wandb: str = _field(
        "off",
        "Also log the metrics to Weights & Biases: offline (files in RUN_DIR/wandb, to "
        "'wandb sync' later) or online; needs pip install wandb.",
        ("off", "offline", "online"),
    )


@dataclass
class ModelConfig:
    """The model: the built-in GPT and its shape, or a local Hugging Face model."""

    source: str = _field(
        "gpt",
        "gpt (the built-in GPT, shaped by the keys below) or hf:PATH (a local Hugging Face "
        "model directory: its config.json, random init, or with weights to continue from; "
        "vocab_size, n_layer, n_head, n_embd, dropout and bias are then the model's own; needs "
        "pip install -e '.[hf]'; docs/hf.md).",
    )
    vocab_size: int = _field(
        256, "gpt: vocabulary size (256 = raw bytes; 50304 = padded GPT-2; >= the tokenizer's)."
    )
    block_size: int = _field(128, "Sequence length in tokens.")
    n_layer: int = _field(4, "gpt: number of transformer blocks.")
    n_head: int = _field(4, "gpt: attention heads per block; must divide n_embd.")
    n_embd: int = _field(128, "gpt: embedding (residual stream) width.")
    dropout: float = _field(0.0, "gpt: dropout probability.")
    bias: bool = _field(False, "gpt: use biases in linear and LayerNorm layers.")


@dataclass
class DataConfig:
    """Training corpus and batch size."""

    source: str = _field(
        "embedded",
        "Corpus: embedded (small built-in text), text:PATH (a UTF-8 file: byte tokens, or "
        "data.tokenizer's), bin:GLOB (uint16 token shards) or hf:PATH (local parquet / jsonl / "
        "arrow files or a datasets.save_to_disk folder: data.text_column tokenized, documents "
        "packed with EOS separators, each group reading its own part; docs/hf.md).",
    )
    val_source: str = _field(
        "auto",
        "Validation tokens: auto (the *_val_* shards beside a bin:..._train_... glob, else "
        "heldout), heldout (held out from data.source), or text:PATH / bin:GLOB / hf:PATH "
        "(read whole).",
    )
    tokenizer: str = _field(
        "",
        "Tokenizer of text: and hf: sources: empty (bytes; for hf: the model directory's "
        "tokenizer when model.source=hf:PATH has one), a local Hugging Face tokenizer directory "
        "or a tokenizers JSON file (diloco tokenizer train makes one).",
    )
    text_column: str = _field("text", "hf: sources: the column holding each document's text.")
    batch_size: int = _field(
        16, "Sequences per inner step per group (the group batch), split evenly across its shards."
    )


@dataclass
class InnerConfig:
    """Inner optimiser: the local steps each group takes between synchronisations."""

    optimizer: str = _field("adamw", "Inner optimiser.", ("adamw", "sgd", "muon"))
    lr: float = _field(3e-3, "Peak learning rate (for muon: of the AdamW-trained parameters).")
    weight_decay: float = _field(0.1, "Decoupled weight decay.")
    betas: list[float] = _field([0.9, 0.95], "AdamW (beta1, beta2).")
    eps: float = _field(1e-8, "AdamW epsilon.")
    momentum: float = _field(0.95, "Momentum for sgd and muon.")
    nesterov: bool = _field(True, "Use Nesterov momentum for sgd and muon.")
    muon_lr: float = _field(0.02, "Learning rate of the 2-D weight matrices when optimizer=muon.")
    warmup_steps: int = _field(50, "Linear learning-rate warmup steps.")
    schedule: str = _field(
        "cosine",
        "Learning-rate schedule after warmup; wsd = warmup, stable, then linear decay.",
        ("constant", "cosine", "wsd"),
    )
    min_lr_ratio: float = _field(0.1, "Final learning rate as a fraction of the peak.")
    decay_frac: float = _field(0.2, "wsd: fraction of the steps spent in the final linear decay.")
    grad_clip: float = _field(1.0, "Gradient-norm clipping threshold; 0 disables clipping.")
    engine: str = _field(
        "fsdp2",
        "What holds a group's fast weights: fsdp2 (FSDP2 over the group's shards; a plain module "
        "when topology.shards=1) or deepspeed (DeepSpeed ZeRO over the group's shards; needs "
        "pip install -e '.[deepspeed]').",
        ("fsdp2", "deepspeed"),
    )
    zero_stage: int = _field(
        2,
        "engine=deepspeed: ZeRO stage; 1 partitions the optimizer state, 2 also the gradients, "
        "3 also the parameters (one of 1, 2, 3).",
    )
    deepspeed: dict[str, Any] = _field(
        {},
        "engine=deepspeed: extra DeepSpeed config, merged into the one diloco builds (batch "
        "sizes, optimizer, gradient_clipping and zero_optimization.stage come from the other "
        "settings and may not be set here).",
    )


@dataclass
class OuterConfig:
    """Outer optimiser: how group updates are combined every ``sync_every`` inner steps."""

    method: str = _field(
        defaults.OUTER_METHOD,
        "Outer step on the averaged update: nesterov (DiLoCo; SNOO with one group), sgd, "
        "ema_nesterov, or none (no outer step: plain data-parallel baseline).",
        defaults.OUTER_METHODS,
    )
    sync_every: int = _field(defaults.SYNC_EVERY, "K: inner steps per round, between outer steps.")
    lr: float = _field(defaults.OUTER_LR, "Outer learning rate (eta).")
    momentum: float = _field(defaults.OUTER_MOMENTUM, "Outer momentum (mu).")
    ema_beta: float = _field(defaults.EMA_BETA, "ema_nesterov: peak EMA coefficient (beta_max).")
    ema_gamma: float = _field(
        defaults.EMA_GAMMA, "ema_nesterov: EMA decay of the momentum buffer (gamma)."
    )
    ema_init: str = _field(
        defaults.EMA_INIT,
        "ema_nesterov: initial momentum buffer; zero, or the first outer update.",
        defaults.EMA_INITS,
    )
    ema_warmup: float = _field(
        0.3, "ema_nesterov: fraction of train.steps at the start during which beta = 0."
    )
    ema_rest: float = _field(
        0.1, "ema_nesterov: fraction of train.steps at the end during which beta = 0."
    )
    offload: str = _field(
        defaults.OFFLOAD,
        "Where the outer state (global weights, momentum) lives: none = device, cpu = host RAM.",
        defaults.OFFLOADS,
    )
    compress: str = _field(
        "none",
        "Precision of the exchanged outer updates: none (fp32 all-reduce), bf16, or int8 with "
        "per-block scales; bf16/int8 use a two-phase exchange with error feedback (the "
        "compression residual is carried to the next round). Does nothing with "
        "topology.groups=1 (nothing is exchanged).",
        defaults.COMPRESS_METHODS,
    )
    compress_block: int = _field(
        256, "outer.compress=int8: elements per block sharing one fp32 scale."
    )
    fragments: int = _field(1, "Streaming: parameter fragments synchronised at staggered times.")
    sync_delay: int = _field(0, "Streaming: inner steps a fragment's average may arrive late.")
    mix_alpha: float = _field(0.0, "Streaming: post-sync weights = alpha*local + (1-alpha)*global.")


@dataclass
class TrainConfig:
    """Run length, evaluation, logging, checkpoints and health checks."""

    steps: int = _field(800, "Total inner steps.")
    eval_every: int = _field(100, "Inner steps between evaluations; 0 = only the final one.")
    eval_batches: int = _field(8, "Batches per evaluation.")
    log_every: int = _field(10, "Inner steps between metric log lines.")
    checkpoint_every: int = _field(0, "Rounds between checkpoints; 0 = no checkpoints.")
    keep_last: int = _field(2, "Checkpoints kept on disk; older ones are deleted.")
    max_bad_rounds: int = _field(
        defaults.MAX_BAD_ROUNDS,
        "Consecutive rounds with a non-finite loss or update before the run stops.",
    )
    check_every: int = _field(10, "Rounds between cross-group weight checksums.")
    compile: bool = _field(False, "torch.compile the transformer blocks and the LM head + loss.")
    activation_checkpointing: bool = _field(
        False, "Recompute each transformer block's activations in the backward pass (less memory)."
    )


@dataclass
class TopologyConfig:
    """Process layout: G groups x S shards = world size."""

    groups: int = _field(1, "G: groups that train independently and meet at outer steps.")
    shards: int = _field(1, "S: data-parallel shards within each group.")
    backend: str = _field(
        "auto",
        "torch.distributed backend; auto = nccl on CUDA, gloo on CPU.",
        ("auto", "gloo", "nccl"),
    )
    mixed_precision: str = _field(
        "auto",
        "Compute precision; auto = bf16 on CUDA, fp32 on CPU; fp64 (every tensor in float64) is "
        "for checking that two layouts compute the same maths (docs/distributed.md).",
        ("auto", "fp32", "bf16", "fp64"),
    )
    timeout_s: int = _field(300, "Process-group timeout in seconds (elastic: also the exchange's).")
    elastic: bool = _field(False, "Groups that may die, stall or join mid-run (docs/elastic.md).")
    group_id: int = _field(-1, "elastic: this process's worker group, 0..groups-1 (-1: not set).")
    coordinator: str = _field("", "elastic: HOST:PORT of the coordinator (diloco coordinator).")
    min_groups: int = _field(1, "elastic: fewest groups a round may run with.")
    heartbeat_timeout_s: float = _field(
        10.0, "elastic: a group silent this long (dead, stopped, hung) is dropped from rounds."
    )
    join_timeout_s: float = _field(
        60.0, "elastic: how long a round (and a fresh start) waits for a late live group."
    )
    quorum_timeout_s: float = _field(
        600.0, "elastic: how long a round waits for min_groups or the coordinator, then stops."
    )


@dataclass
class Config:
    """A complete run configuration; build it with load_config or config_from_dict to validate."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)
_TYPES: dict[str, dict[str, Any]] = {
    name: typing.get_type_hints(cls) for name, cls in _SECTIONS.items()
}
_KEYS: list[str] = [f"{name}.{key}" for name, types in _TYPES.items() for key in types]

#: Settings that do not change the maths, left out of :func:`config_fingerprint`. ``train.steps``
#: is among them so that a finished run can be resumed with more steps.
FINGERPRINT_IGNORE: tuple[str, ...] = (
    "run.out_dir",
    "run.progress",
    "run.tensorboard",
    "run.wandb",
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "topology.timeout_s",
    "topology.group_id",
    "topology.coordinator",
    "topology.heartbeat_timeout_s",
    "topology.join_timeout_s",
    "topology.quorum_timeout_s",
)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load the defaults, merge the YAML file at ``path`` and the ``--set`` overrides, validate.

    Each override is ``section.key=value``; the value is parsed by the key's type
    (:func:`~diloco.config.values.override_value`): a string key takes the text as typed,
    numbers and booleans (``true``/``false``) are parsed strictly, lists and mappings as YAML
    (``[0.9, 0.95]``). Raises :class:`ConfigError` for any problem.
    """
    sections = _sections(read_yaml(Path(path)), f"config file '{path}'") if path else {}
    for override in overrides:
        _apply_override(sections, override)
    return config_from_dict(sections)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build a validated :class:`Config` from nested mappings; absent keys keep their defaults."""
    sections = {}
    for name, values in _sections(data, "config").items():
        specs = {f.name: f for f in dataclasses.fields(_SECTIONS[name])}
        kwargs = {}
        for key, value in values.items():
            dotted = f"{name}.{key}"
            if key not in specs:
                raise _unknown_key(name, key)
            kwargs[key] = _coerce(dotted, value, _TYPES[name][key], specs[key].metadata["choices"])
        sections[name] = _SECTIONS[name](**kwargs)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts of JSON/YAML scalars and lists."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    header = "# Resolved diloco config (defaults + config file + --set overrides).\n"
    write_text_atomic(path, header + text)


def config_fingerprint(cfg: Config, ignore: Sequence[str] = FINGERPRINT_IGNORE) -> str:
    """A stable 16-hex-digit hash of every setting except the dotted keys in ``ignore``."""
    data = config_to_dict(cfg)
    for dotted in ignore:
        section, key = dotted.split(".")
        del data[section][key]
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_reference() -> str:
    """A Markdown reference of every section and key: default, allowed values and meaning."""
    lines = []
    for name, cls in _SECTIONS.items():
        example = cls()
        lines += ["", f"### `{name}`", "", cls.__doc__, "", "| key | default | meaning |"]
        lines.append("|---|---|---|")
        for f in dataclasses.fields(cls):
            default = getattr(example, f.name)
            shown = default if isinstance(default, str) else json.dumps(default)
            choices = f.metadata["choices"]
            allowed = f" One of: {', '.join(choices)}." if choices else ""
            lines.append(f"| `{f.name}` | `{shown}` | {f.metadata['doc']}{allowed} |")
    return "\n".join(lines[1:]) + "\n"


# --- reading and merging -------------------------------------------------------------------------


def _sections(data: Any, origin: str) -> dict[str, dict[str, Any]]:
    """Copy ``data`` as ``{section: {key: value}}``, rejecting unknown or malformed sections.

    An empty document or an empty section (``outer:`` with nothing under it) counts as ``{}``.
    """
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin} must be a mapping of sections ({', '.join(_SECTIONS)}), got {shown(data)}"
        )
    sections = {}
    for name, values in data.items():
        if name not in _SECTIONS:
            close = difflib.get_close_matches(str(name), list(_SECTIONS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(_SECTIONS)}"
            raise ConfigError(f"unknown config section '{name}'; {hint}")
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"config section '{name}' must be a mapping of key: value, got {shown(values)}"
            )
        sections[name] = dict(values)
    return sections


def _apply_override(sections: dict[str, dict[str, Any]], override: str) -> None:
    """Set one ``section.key=value`` override (value parsed by the key's type) into ``sections``."""
    dotted, eq, text = override.partition("=")
    dotted = dotted.strip()
    name, dot, key = dotted.partition(".")
    if not (eq and dot and name and key) or "." in key:
        close = _closest_key(name, key) if dot else _closest_key("", name)
        hint = f"; did you mean --set {close}={text}?" if eq and close else ""
        raise ConfigError(
            f"--set {override!r} is not of the form --set section.key=value "
            f"(e.g. --set outer.sync_every=32){hint}"
        )
    value = override_value(override, text, hint_of(_TYPES, name, key))
    sections.setdefault(name, {})[key] = value


def _closest_key(section: str, key: str) -> str | None:
    """The valid dotted key closest to ``section.key``: same section first, then any section."""
    same = difflib.get_close_matches(key, list(_TYPES.get(section, {})), n=1)
    if same:
        return f"{section}.{same[0]}"
    by_name = {dotted.split(".")[1]: dotted for dotted in reversed(_KEYS)}  # first section wins
    anywhere = difflib.get_close_matches(key, list(by_name), n=1)
    return by_name[anywhere[0]] if anywhere else None


def _unknown_key(section: str, key: str) -> ConfigError:
    """The error for an unknown key in a known section, suggesting the closest valid key."""
    close = _closest_key(section, str(key))
    if close:
        return ConfigError(f"unknown config key '{section}.{key}'; did you mean '{close}'?")
    valid = ", ".join(_TYPES[section])
    return ConfigError(f"unknown config key '{section}.{key}'; valid keys in '{section}': {valid}")


# --- types ---------------------------------------------------------------------------------------


def _coerce(key: str, value: Any, hint: Any, choices: tuple[str, ...]) -> Any:
    """Check ``value`` against a field's type (or its choices); return it in canonical form."""
    if choices:
        if isinstance(value, str) and value in choices:
            return value
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            return "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        surprise = yaml_surprise(value, str)
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}{surprise}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif hint is float:
        number = as_float(value)
        if number is not None and math.isfinite(number):
            return number
        expected = "a finite number"
    elif hint is str:
        if isinstance(value, str):
            return value
        expected = "a string"
    elif typing.get_origin(hint) is dict:  # inner.deepspeed: a mapping passed through
        if isinstance(value, Mapping):
            with contextlib.suppress(TypeError, ValueError):
                return json.loads(json.dumps(dict(value)))  # a plain deep copy of JSON values
        expected = "a mapping of JSON values (as in a DeepSpeed config)"
    else:  # list[float], the only other field type
        if isinstance(value, (list, tuple)):
            numbers = [as_float(item) for item in value]
            if None not in numbers:
                return numbers
        expected = "a list of numbers"
    raise ConfigError(f"{key} must be {expected}, got {shown(value)}{yaml_surprise(value, hint)}")
