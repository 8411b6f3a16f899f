"""Hugging Face causal LMs (``model.source: hf:PATH``) behind the GPT's interface.

PATH is a local directory holding a ``config.json`` (and, to continue training, its weights:
``model.safetensors``, sharded safetensors or ``pytorch_model.bin``); nothing is downloaded.
:class:`HFCausalLM` wraps the ``transformers`` model so that the job treats it like the GPT:

    logits = hf(input_ids=idx).logits                            [B, T, V]
    loss   = mean_{b,t} -log softmax(logits[b, t])[targets[b, t]]   (at least fp32)

Its parameters are the wrapped model's under the prefix ``hf.`` (``hf.model.layers.3.…``), so a
decoder layer's parameters carry its index as their first all-digit name component, which is
how streaming fragments are cut (:mod:`diloco.algorithm.fragments`). :attr:`HFCausalLM.blocks`
lists the decoder layers (the modules of the classes in ``_no_split_modules``, else
``model.layers``): FSDP2 shards each of them, then the root, which holds the embeddings, the
final norm and the LM head (tied or not: a tied pair is one parameter, in the root).

``transformers`` is imported only here, and only when such a model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diloco.errors import ConfigError
from diloco.models.gpt import lm_loss

__all__ = [
    "HFCausalLM",
    "compile_hf",
    "decoder_layers",
    "has_weights",
    "hf_config",
    "hf_dims",
    "hf_dir",
    "hf_model",
    "import_transformers",
    "load_hf_model",
]

_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_MISSING = (
    "{key}={value!r} needs the transformers package: pip install -e '.[hf]' "
    "(transformers, tokenizers, datasets)"
)


def hf_dir(source: str, key: str = "model.source") -> Path:
    """The local directory of ``hf:PATH``; a hub name or a path without ``config.json`` raises
    :class:`ConfigError` naming ``key``, the value and the fix."""
    path = Path(source.removeprefix("hf:")).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ConfigError(
            f"{key}={source!r}: {path} has no config.json; point it at a Hugging Face model "
            "directory (save_pretrained writes one)"
        )
    if not path.exists() and not path.is_absolute() and path.parts and len(path.parts) <= 2:
        raise ConfigError(
            f"{key}={source!r} is not a local directory and nothing is downloaded; if it is a "
            f"hub name, download it first (huggingface-cli download {path} --local-dir DIR) and "
            "set hf:DIR"
        )
    raise ConfigError(f"{key}={source!r}: {path} does not exist; fix the path")


def import_transformers(source: str) -> Any:
    """The ``transformers`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(HF_MISSING.format(key="model.source", value=source)) from None
    return transformers


def hf_config(source: str) -> Any:
    """The ``transformers`` config of ``hf:PATH`` (offline; errors as :func:`hf_dir`)."""
    path = hf_dir(source)
    transformers = import_transformers(source)
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"model.source={source!r}: transformers cannot read {path / 'config.json'} "
            f"({type(e).__name__}: {_first_line(e)}); fix config.json"
        ) from None


def has_weights(source: str) -> bool:
    """Whether ``hf:PATH`` holds weights (then training continues from them)."""
    path = hf_dir(source)
    return any((path / name).is_file() for name in _WEIGHTS)


def load_hf_model(source: str, seed: int) -> HFCausalLM:
    """The model of ``hf:PATH`` in fp32: ``from_pretrained`` when the directory holds weights,
    else ``from_config`` initialised after ``torch.manual_seed(seed)`` (the same on every rank).

    Raises:
        ConfigError: missing directory or package, or a config the library cannot build.
    """
    torch.manual_seed(seed)
    return HFCausalLM(hf_model(source, weights=has_weights(source)))


def hf_model(source: str, weights: bool = False) -> nn.Module:
    """The ``transformers`` causal LM of ``hf:PATH`` in fp32: ``from_pretrained`` with
    ``weights``, else ``from_config`` (random init from torch's RNG, or shapes only under a
    ``torch.device("meta")`` context). Errors as :func:`load_hf_model`."""
    path = hf_dir(source)
    auto = import_transformers(source).AutoModelForCausalLM
    config = hf_config(source)
    try:
        if weights:
            return auto.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        return auto.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ConfigError(
            f"model.source={source!r}: transformers cannot build a causal LM from {path} "
            f"({type(e).__name__}: {_first_line(e)}); fix its config.json"
        ) from None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, in order: modules of the classes the model lists in
    ``_no_split_modules``, or else the children of its ``model.layers`` (or ``layers``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    return list(getattr(base, "layers", []))


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM as ``model(idx, targets) -> (logits, loss)``.

    ``idx``, ``targets``: int64 [B, T]; targets are the next tokens (already shifted), so the
    loss is plain cross-entropy over all B·T positions, as the GPT's.
    """

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.config = hf.config

    @property
    def blocks(self) -> list[nn.Module]:
        """The decoder layers (what FSDP2 shards one by one, and compile/recompute wrap)."""
        return decoder_layers(self.hf)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_output_embeddings().weight.shape[0])

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (tied embeddings once); ``non_embedding``: without the input
        embedding (position embeddings too, when the model has learned ones)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            tied = self.hf.get_input_embeddings().weight is self.hf.get_output_embeddings().weight
            n -= 0 if tied else self.hf.get_input_embeddings().weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.hf(input_ids=idx, use_cache=False).logits
        return self.head_loss(logits, targets)

    def head_loss(
        self, logits: torch.Tensor, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, mean cross-entropy in fp32 vs ``targets``, or None)."""
        if targets is None:
            return logits, None
        return logits, lm_loss(logits, targets)


def compile_hf(model: HFCausalLM) -> None:
    """``torch.compile`` each decoder layer's ``forward`` and the loss, in place (names and module
    hooks unchanged, as :func:`diloco.models.compile_gpt`)."""
    for layer in model.blocks:
        layer.forward = torch.compile(layer.forward)
    model.head_loss = torch.compile(model.head_loss)


def hf_dims(source: str) -> tuple[int, int, int]:
    """(layers, hidden width, vocabulary) of ``hf:PATH``'s config."""
    config = hf_config(source)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    return int(layers), int(width), int(config.vocab_size)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:240] + ("…" if len(text) > 240 else "")
