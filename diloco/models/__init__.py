"""Model definitions."""

from diloco.models.gpt import GPT, GPTConfig, compile_gpt

__all__ = ["GPT", "GPTConfig", "compile_gpt"]
