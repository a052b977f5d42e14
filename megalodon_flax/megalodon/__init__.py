"""Megalodon (spec §2-§5): CEMA, TimestepNorm, chunked attention, the gated block, the LM."""

from megalodon_flax.megalodon.cache import AttentionCache, LayerCache, ModelCache, init_cache
from megalodon_flax.megalodon.config import MegalodonConfig, enwik8_config, hf_compatible
from megalodon_flax.megalodon.model import MegalodonBlock, MegalodonLM, MegalodonModel
from megalodon_flax.megalodon.param_count import count_params, parameter_breakdown, parameter_count
from megalodon_flax.megalodon.timestep_norm import NormState

__all__ = [
    "AttentionCache",
    "LayerCache",
    "MegalodonBlock",
    "MegalodonConfig",
    "MegalodonLM",
    "MegalodonModel",
    "ModelCache",
    "NormState",
    "count_params",
    "enwik8_config",
    "hf_compatible",
    "init_cache",
    "parameter_breakdown",
    "parameter_count",
]
