"""Model definitions: the built-in GPT, Hugging Face causal LMs (:mod:`diloco.models.hf`,
imported on demand) and the builder of the configured one (:mod:`diloco.models.build`)."""

from diloco.models.gpt import GPT, GPTConfig, compile_gpt

__all__ = ["GPT", "GPTConfig", "compile_gpt"]
