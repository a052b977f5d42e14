"""The model families a training config can name, and how each is built.

`config.model_family` picks the family (`megalodon`, the default, or the `llama` baseline);
`config.model` holds that family's config fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megalodon_flax.config import ConfigError, MegalodonConfig
from megalodon_flax.llama import LlamaCache, LlamaConfig, LlamaLM, init_llama_cache
from megalodon_flax.model import MegalodonLM, parameter_breakdown

FAMILIES: tuple[str, ...] = ("megalodon", "llama")
DEFAULT_FAMILY = "megalodon"
# Families whose models carry unlimited context in a fixed-size state (stream evaluation).
CARRIED_STATE_FAMILIES: frozenset[str] = frozenset({"megalodon"})

ModelConfig = MegalodonConfig | LlamaConfig
LanguageModel = MegalodonLM | LlamaLM
_MODEL_CLASSES: dict[str, type[MegalodonLM] | type[LlamaLM]] = {
    "megalodon": MegalodonLM,
    "llama": LlamaLM,
}


def family_of(config: Mapping[str, Any]) -> str:
    """The `model_family` of a training config (`DEFAULT_FAMILY` when the field is absent)."""
    family = config.get("model_family", DEFAULT_FAMILY)
    if family not in FAMILIES:
        raise ConfigError(f"config.model_family must be one of {FAMILIES}, got {family!r}")
    return family


def model_config_from(config: Mapping[str, Any], family: str | None = None) -> ModelConfig:
    """Builds the validated model config of a training config's family from `config.model`.

    Args:
        config: A training config.
        family: Its `family_of(config)` when the caller already has it.
    """
    if family is None:
        family = family_of(config)
    cls = LlamaConfig if family == "llama" else MegalodonConfig
    return cls.from_mapping(config["model"])


def build_model(model_config: ModelConfig) -> LanguageModel:
    """The language model module of a model config."""
    if isinstance(model_config, LlamaConfig):
        return LlamaLM(model_config)
    return MegalodonLM(model_config)


def closed_form_parameter_count(model_config: ModelConfig) -> int:
    """The parameter count implied by the config's sizes (checked against the built tree)."""
    if isinstance(model_config, LlamaConfig):
        return model_config.parameter_count()
    return parameter_breakdown(model_config)["total"]


def has_carried_state(model: LanguageModel) -> bool:
    """Whether the model carries unlimited context in a fixed-size state (stream evaluation)."""
    return any(isinstance(model, _MODEL_CLASSES[f]) for f in CARRIED_STATE_FAMILIES)


def decode_cache(model: LanguageModel, batch_size: int, capacity: int) -> LlamaCache | None:
    """The cache a decode starts from: an empty `LlamaCache` of `capacity` positions per row
    (B = batch_size) for `LlamaLM`, None for `MegalodonLM` (it builds its fixed-size
    `ModelCache` in the first cached call)."""
    if isinstance(model, LlamaLM):
        return init_llama_cache(model.config, batch_size, capacity)
    return None
