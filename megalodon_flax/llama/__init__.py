"""The Llama baseline of the enwik8 comparison (same training loop, same axis names)."""

from megalodon_flax.llama.cache import LayerKV, LlamaCache, init_cache
from megalodon_flax.llama.config import LlamaConfig
from megalodon_flax.llama.model import LlamaLM
from megalodon_flax.llama.param_count import parameter_breakdown

__all__ = ["LayerKV", "LlamaCache", "LlamaConfig", "LlamaLM", "init_cache", "parameter_breakdown"]
