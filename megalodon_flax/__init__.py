"""megalodon_flax: Megalodon (Ma et al. 2024) in JAX/Flax Linen.

The public API: the model configs and language models of both families, the streaming cache,
parameter counts and generation. Training lives in `megalodon_flax.training`, evaluation in
`megalodon_flax.evaluation`, the commands in `megalodon_flax.cli`.
"""

from megalodon_flax.config_base import ConfigError
from megalodon_flax.llama import LlamaConfig, LlamaLM
from megalodon_flax.megalodon import (
    MegalodonConfig,
    MegalodonLM,
    ModelCache,
    count_params,
    enwik8_config,
    hf_compatible,
    init_cache,
    parameter_breakdown,
    parameter_count,
)
from megalodon_flax.sampling import generate

__all__ = [
    "ConfigError",
    "LlamaConfig",
    "LlamaLM",
    "MegalodonConfig",
    "MegalodonLM",
    "ModelCache",
    "count_params",
    "enwik8_config",
    "generate",
    "hf_compatible",
    "init_cache",
    "parameter_breakdown",
    "parameter_count",
]
__version__ = "0.1.0"
