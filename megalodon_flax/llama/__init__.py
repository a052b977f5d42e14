"""The Llama baseline of the enwik8 comparison (same training loop, same axis names)."""

from megalodon_flax.llama.config import LlamaConfig
from megalodon_flax.llama.model import LayerKV, LlamaCache, LlamaLM, init_llama_cache

__all__ = ["LayerKV", "LlamaCache", "LlamaConfig", "LlamaLM", "init_llama_cache"]
