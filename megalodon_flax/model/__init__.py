"""Flax Linen modules of Megalodon."""

from megalodon_flax.model.cache import AttentionCache, LayerCache, ModelCache, init_cache
from megalodon_flax.model.megalodon import MegalodonBlock, MegalodonLM, MegalodonModel
from megalodon_flax.model.param_count import count_params, parameter_breakdown, parameter_count
from megalodon_flax.model.timestep_norm import NormState

__all__ = [
    "AttentionCache",
    "LayerCache",
    "MegalodonBlock",
    "MegalodonLM",
    "MegalodonModel",
    "ModelCache",
    "NormState",
    "count_params",
    "init_cache",
    "parameter_breakdown",
    "parameter_count",
]
