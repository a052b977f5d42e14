"""The model families a training config can name, and how each is built.

`config.model_family` picks the family (`megalodon`, the default, or the `llama` baseline);
`config.model` holds that family's config fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megalodon_flax.config import ConfigError, MegalodonConfig
from megalodon_flax.llama import LlamaConfig, LlamaLM
from megalodon_flax.model import MegalodonLM, parameter_breakdown

FAMILIES: tuple[str, ...] = ("megalodon", "llama")

ModelConfig = MegalodonConfig | LlamaConfig
LanguageModel = MegalodonLM | LlamaLM


def family_of(config: Mapping[str, Any]) -> str:
    """The `model_family` of a training config ('megalodon' when the field is absent)."""
    family = config.get("model_family", "megalodon")
    if family not in FAMILIES:
        raise ConfigError(f"config.model_family must be one of {FAMILIES}, got {family!r}")
    return family


def model_config_from(config: Mapping[str, Any]) -> ModelConfig:
    """Builds the validated model config of a training config's family from `config.model`."""
    cls = LlamaConfig if family_of(config) == "llama" else MegalodonConfig
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
    return isinstance(model, MegalodonLM)
