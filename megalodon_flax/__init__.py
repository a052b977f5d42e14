"""megalodon_flax: Megalodon (Ma et al. 2024) in JAX/Flax Linen."""

from megalodon_flax.config import ConfigError, MegalodonConfig, enwik8_config, hf_compatible
from megalodon_flax.model import (
    MegalodonLM,
    ModelCache,
    count_params,
    init_cache,
    parameter_breakdown,
    parameter_count,
)

__all__ = [
    "ConfigError",
    "MegalodonConfig",
    "MegalodonLM",
    "ModelCache",
    "count_params",
    "enwik8_config",
    "hf_compatible",
    "init_cache",
    "parameter_breakdown",
    "parameter_count",
]
__version__ = "0.1.0"
