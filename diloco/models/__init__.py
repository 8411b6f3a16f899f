"""Model definitions."""

from diloco.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
