"""A nanoGPT-style decoder-only transformer.

Shapes: ``B`` batch, ``T`` sequence length (``T <= block_size``), ``C = n_embd``,
``H = n_head``, ``D = C / H`` head size, ``V = vocab_size``.

    x_0     = wte(idx) + wpe(0..T-1)                       [B, T, C]
    x_{l+1} = x_l' + mlp(ln2(x_l')),  x_l' = x_l + attn(ln1(x_l))   (pre-norm blocks)
    logits  = ln_f(x_L) @ wte.weight^T                     [B, T, V]   (lm_head tied to wte)
    loss    = mean_{b,t} -log softmax(logits[b, t])[targets[b, t]]   (fp32, any compute dtype)

Each block is a separate module in ``GPT.blocks`` so that FSDP2 can ``fully_shard`` the blocks
one by one and then the root (which owns ``wte``, ``wpe``, ``ln_f`` and the tied ``lm_head``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diloco.errors import ConfigError


@dataclass
class GPTConfig:
    """Model hyper-parameters; ``n_embd`` must be divisible by ``n_head``. ``source`` mirrors
    ``model.source`` so that a ``model`` config section converts as it is; it must be ``gpt``
    (a Hugging Face model is built by :func:`diloco.models.build.build_model`)."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    source: str = "gpt"

    def __post_init__(self) -> None:
        if self.source != "gpt":
            raise ConfigError(
                f"GPTConfig(source={self.source!r}) is not the built-in GPT; build model.source "
                "models with diloco.models.build.build_model"
            )
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "pick n_embd as a multiple of n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


class LayerNorm(nn.Module):
    """LayerNorm over the last dim ``C`` with a learned gain and an optional bias."""

    def __init__(self, n_embd: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``[B, T, C] -> [B, T, C]``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, 3C] -> three [B, H, T, D]
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for t in self.c_attn(x).split(C, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """``x -> c_proj(gelu(c_fc(x)))`` with hidden width ``4C``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only language model; see the module docstring for the maths."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanoGPT init: weights ~ N(0, 0.02), biases 0, LayerNorm gain 1.

        Residual projections (``attn.c_proj``, ``mlp.c_proj``) use std ``0.02 / sqrt(2 n_layer)``
        so the residual stream's variance does not grow with depth. Deterministic under
        ``torch.manual_seed``; call again after ``to_empty()`` when built on the meta device.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):  # wte is also lm_head.weight
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of distinct parameters (the tied ``wte``/``lm_head`` weight counts once).

        With ``non_embedding=True`` the position embedding ``wpe`` is left out; ``wte`` stays
        in because, tied to ``lm_head``, it is also the output projection (as in nanoGPT).
        """
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx`` [B, T] int64 -> (logits [B, T, V], mean cross-entropy vs ``targets`` or None)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds model block_size {self.config.block_size}; "
                "feed shorter sequences or build the model with a larger block_size"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(x, targets)

    def head(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final norm, tied LM head and loss: ``x`` [B, T, C] -> (logits [B, T, V], loss)."""
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, lm_loss(logits, targets)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [B, T, V] against ``targets`` [B, T], computed in at
    least fp32 whatever the compute dtype (bf16 logits from FSDP2's bf16 parameters are upcast;
    under autocast cross-entropy runs in fp32 anyway; fp64 logits stay fp64)."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.flatten(0, 1).to(wide), targets.flatten())


def compile_gpt(model: GPT) -> None:
    """``torch.compile`` the model's compute in place: each block's ``forward`` and the head
    (final norm, LM head, loss). Modules, parameter names and module hooks are unchanged: FSDP2's
    hooks, which must stay outside compiled code, still run around each block, and checkpoints
    see the same state dict. The embeddings stay eager (a gather and an add)."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)
    model.head = torch.compile(model.head)
