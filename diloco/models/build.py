"""The configured model (``model.source``): the built-in GPT or a local Hugging Face model.

Both are ``model(idx, targets) -> (logits, loss)`` modules with their transformer blocks in
``model.blocks`` (what FSDP2 shards one by one, ``train.compile`` compiles and
``train.activation_checkpointing`` recomputes) and the rest in the root.
:class:`ModelDims` holds what the job's estimates need (layers, width, vocabulary,
non-embedding parameters), read without building the weights.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diloco.config import ModelConfig
from diloco.errors import ConfigError
from diloco.models.gpt import GPT, GPTConfig, compile_gpt

__all__ = [
    "ModelDims",
    "build_model",
    "checkpoint_blocks",
    "is_hf",
    "meta_model",
    "model_dims",
    "model_vocab",
]


@dataclass(frozen=True)
class ModelDims:
    """Shape of the configured model: L layers of width C, vocabulary V, T tokens per sequence,
    N parameters without the embedding tables (the FLOPs estimate's 6·N)."""

    n_layer: int
    n_embd: int
    vocab_size: int
    block_size: int
    non_embedding_params: int


def is_hf(model: ModelConfig) -> bool:
    return model.source.startswith("hf:")


def meta_model(model: ModelConfig) -> nn.Module:
    """The configured model on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        if is_hf(model):
            from diloco.models.hf import HFCausalLM, hf_model

            return HFCausalLM(hf_model(model.source))
        return GPT(GPTConfig(**dataclasses.asdict(model)))


def model_dims(model: ModelConfig) -> ModelDims:
    """:class:`ModelDims` of the configured model."""
    n = meta_model(model).num_params(non_embedding=True)  # first: a model that cannot be built
    if is_hf(model):
        from diloco.models.hf import hf_dims

        layers, width, vocab = hf_dims(model.source)
    else:
        layers, width, vocab = model.n_layer, model.n_embd, model.vocab_size
    return ModelDims(layers, width, vocab, model.block_size, n)


def build_model(
    model: ModelConfig, seed: int, vocab_size: int, compile: bool = False, recompute: bool = False
) -> nn.Module:
    """The model of ``model`` (``model.source``), initialised after ``torch.manual_seed(seed)``
    (identical on every rank) or loaded from its directory's weights; ``vocab_size`` is the
    data's vocabulary, which must fit the model's. ``compile``: ``torch.compile`` the blocks and
    the loss; ``recompute``: activation checkpointing of every block.

    Raises:
        ConfigError: the data's vocabulary exceeds the model's, or the model cannot be built.
    """
    if is_hf(model):
        from diloco.models.hf import compile_hf, load_hf_model

        net: nn.Module = load_hf_model(model.source, seed)
        if vocab_size > net.vocab_size:
            raise ConfigError(
                f"the data's tokenizer has {vocab_size} tokens but model.source="
                f"{model.source!r} has vocab_size {net.vocab_size}; use the model's own "
                "tokenizer (data.tokenizer) or a model config with vocab_size >= "
                f"{vocab_size}"
            )
        compile_blocks: Any = compile_hf
    else:
        if vocab_size > model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={model.vocab_size} is smaller than the corpus vocabulary "
                f"({vocab_size}); set model.vocab_size >= {-(-vocab_size // 64) * 64}"
            )
        torch.manual_seed(seed)
        net = GPT(GPTConfig(**dataclasses.asdict(model)))
        compile_blocks = compile_gpt
    if compile:
        compile_blocks(net)
    if recompute:
        checkpoint_blocks(net.blocks)
    return net


def model_vocab(net: nn.Module) -> int:
    """Rows of the model's output layer: the largest token id + 1 it can take."""
    if isinstance(net, GPT):
        return net.config.vocab_size
    return int(net.vocab_size)


def checkpoint_blocks(blocks: list[nn.Module]) -> None:
    """Activation checkpointing: each block's ``forward`` runs under non-reentrant
    ``torch.utils.checkpoint``, keeping only its inputs and recomputing the rest in the
    backward pass. Module names, parameters and hooks (FSDP2's) are unchanged."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
