"""Checks before any work: the device exists, and the run fits in memory.

:func:`check_device` refuses ``run.device=cuda`` without a usable CUDA device (also under
torchrun, where each rank needs its own ``LOCAL_RANK`` device). :func:`estimate_memory` adds up
roughly what one process holds: parameters, gradients, inner optimiser state, θ and the outer
state, the compressed exchange's buffers, activations of one batch, the val batches;
:func:`check_memory` refuses a run whose estimate exceeds the memory available to a process
(host RAM shared by the node's processes, or the GPU's free memory), with the estimate in the
message. The estimate is rough (within a factor of about two); it exists to turn an allocation
that could never succeed into one line before training starts.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from diloco.config import Config
from diloco.errors import ConfigError, TopologyError
from diloco.job.metrics import WANDB_MISSING
from diloco.persist.resume import model_shapes

__all__ = [
    "available_memory",
    "check_device",
    "check_memory",
    "check_packages",
    "check_model",
    "estimate_memory",
]

#: Inner optimiser state, bytes per parameter (fp32): AdamW's two moments; SGD's and Muon's
#: momentum (Muon's AdamW-trained part has two: counted as the larger).
_INNER_STATE = {"adamw": 8, "sgd": 4, "muon": 8}
_GIB = 2**30


def check_device(device: str) -> None:
    """Raise for ``run.device=cuda`` when torch sees no CUDA device for this process."""
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA"
        raise ConfigError(
            f"run.device=cuda but no CUDA device is available (torch {torch.__version__}, built "
            f"with {built}); use run.device=cpu or auto, or install a CUDA build of torch"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise TopologyError(
            f"LOCAL_RANK={local_rank} but this node has {count} CUDA device(s); launch at most "
            f"{count} processes per node (torchrun --nproc-per-node={count})"
        )


def check_packages(cfg: Config) -> None:
    """Raise when an optional package the run's settings need is not installed."""
    if cfg.run.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(WANDB_MISSING.format(mode=cfg.run.wandb))
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "run.tensorboard=true needs the tensorboard package: pip install tensorboard (or "
            "pip install -e '.[tensorboard]'), or set run.tensorboard=false"
        )


def check_model(cfg: Config) -> None:
    """Raise when the model cannot take the run: a tokenizer (``data.tokenizer``, or the one in
    ``model.source=hf:PATH``'s directory) with more tokens than the model's vocabulary, or more
    streaming fragments than a Hugging Face model has layers. Checked before any data is read."""
    from diloco.job.tokenizer import load_tokenizer, tokenizer_path
    from diloco.models.build import model_dims

    if cfg.model.source != "gpt" and cfg.outer.fragments > model_dims(cfg.model).n_layer:
        layers = model_dims(cfg.model).n_layer
        raise ConfigError(
            f"outer.fragments ({cfg.outer.fragments}) must be <= the {layers} layers of "
            f"model.source={cfg.model.source!r}: each fragment holds at least one layer"
        )
    path = tokenizer_path(cfg.data.tokenizer, cfg.model.source)
    if not path:
        return
    tokens, vocab = load_tokenizer(path).vocab_size, model_dims(cfg.model).vocab_size
    if tokens <= vocab:
        return
    if cfg.model.source == "gpt":
        fix = f"set model.vocab_size >= {-(-tokens // 64) * 64}"
    else:
        fix = f"use the model's own tokenizer or a model config with vocab_size >= {tokens}"
    raise ConfigError(
        f"data.tokenizer={path!r} has {tokens} tokens, more than the vocabulary of "
        f"model.source={cfg.model.source!r} ({vocab}); {fix}"
    )


def estimate_memory(cfg: Config) -> dict[str, float]:
    """Bytes one process needs, by part: ``{"parameters", "gradients", "inner state",
    "outer state", "exchange", "activations", "val batches"}``; ``"outer state"`` lives in host
    RAM with ``outer.offload=cpu``, ``"val batches"`` always. An fp64 run needs twice the bytes
    of an fp32 one for everything but the val batches."""
    from diloco.models.build import model_dims

    m, o = model_dims(cfg.model), cfg.outer
    n = sum(math.prod(shape) for shape in model_shapes(cfg).values()) / cfg.topology.shards
    outer = {"none": 0, "sgd": 4, "nesterov": 8 if o.momentum > 0 else 4, "ema_nesterov": 8}
    groups = cfg.topology.groups
    exchange = 0.0
    if groups > 1:
        exchange = 4 * n  # the reducer's flat copy of Δ
        if o.compress != "none":  # error-feedback residual, encoded chunks, decoded chunk
            exchange += 4 * n + 3 * 4 * max(n, groups * o.compress_block)
    t = m.block_size
    tokens = cfg.data.batch_size / cfg.topology.shards * t
    # Per layer and token ~17·C stored values (Korthikanti et al. 2022); the attention scores
    # (H·T) are not stored: scaled_dot_product_attention uses fused kernels on CPU and GPU.
    per_token = (2 if _bf16(cfg) else 4) * 17 * m.n_embd
    logits = 2 * tokens * m.vocab_size * 4  # fp32 logits for the loss, and their gradient
    wide = 2 if cfg.topology.mixed_precision == "fp64" else 1
    return {
        "parameters": wide * 4 * n,
        "gradients": wide * 4 * n,
        "inner state": wide * _INNER_STATE[cfg.inner.optimizer] * n,
        "outer state": wide * outer[o.method] * n,
        "exchange": wide * exchange,
        "activations": wide * (m.n_layer * tokens * per_token + logits),
        "val batches": 2 * 8 * cfg.train.eval_batches * cfg.data.batch_size * t,
    }


def _bf16(cfg: Config) -> bool:
    precision = cfg.topology.mixed_precision
    return precision == "bf16" or (precision == "auto" and cfg.run.device == "cuda")


def available_memory(device: str) -> float:
    """Bytes a process may use: the GPU's free memory, or the host's available RAM divided
    among this node's processes (``LOCAL_WORLD_SIZE``)."""
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return float(torch.cuda.mem_get_info(local_rank)[0])
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    return _host_available() / local


def _host_available() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check_memory(cfg: Config) -> None:
    """Raise ConfigError when the run's estimate exceeds the memory available to a process."""
    device = cfg.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = estimate_memory(cfg)
    host_only = {"val batches"} | ({"outer state"} if cfg.outer.offload == "cpu" else set())
    places = {"cpu": dict(parts)} if device == "cpu" else {
        "cuda": {k: v for k, v in parts.items() if k not in host_only},
        "cpu": {k: v for k, v in parts.items() if k in host_only},
    }  # fmt: skip
    for where, need in places.items():
        total, available = sum(need.values()), available_memory(where)
        if total <= available:
            continue
        biggest = sorted(need.items(), key=lambda kv: -kv[1])[:3]
        detail = ", ".join(f"{name} {v / _GIB:.1f}" for name, v in biggest)
        memory = "GPU memory free" if where == "cuda" else "host RAM available per process"
        raise ConfigError(
            f"this run needs about {total / _GIB:.1f} GiB per process ({detail} GiB) but "
            f"{available / _GIB:.1f} GiB of {memory}; lower data.batch_size, model.block_size "
            "or the model size, or spread it over more topology.shards"
        )
