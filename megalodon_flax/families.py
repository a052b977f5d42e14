"""The model families a training config can name, and how each is built.

`config.model_family` picks the family (`megalodon`, the default, or the `llama` baseline);
`config.model` holds that family's config fields. Each `Family` says what the rest of the
package needs to drive a family without knowing it: its config class, its module, how to
start a cache, its closed-form parameter count and whether it carries unlimited context in
a fixed-size state (stream evaluation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from megalodon_flax import llama, megalodon
from megalodon_flax.config_base import ConfigError

ModelConfig = megalodon.MegalodonConfig | llama.LlamaConfig
LanguageModel = megalodon.MegalodonLM | llama.LlamaLM


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: The `config.model_family` value.
        config_class: Its frozen model config (with `from_mapping`).
        module_class: Its language model, called as `(tokens, *, cache=None,
            attention_mask=None, segment_ids=None, deterministic=True, return_cache=False)`.
        init_cache: `(config, batch_size, capacity) -> cache` for `capacity` positions per
            row (a carried-state family ignores the capacity: its state has a fixed size).
        parameter_count: `config -> int`, the closed form checked against the built tree.
        carries_state: Whether the model carries unlimited context in a fixed-size state.
    """

    name: str
    config_class: type[ModelConfig]
    module_class: type[LanguageModel]
    init_cache: Callable[[Any, int, int], Any]
    parameter_count: Callable[[Any], int]
    carries_state: bool


FAMILIES: dict[str, Family] = {
    "megalodon": Family(
        name="megalodon",
        config_class=megalodon.MegalodonConfig,
        module_class=megalodon.MegalodonLM,
        init_cache=lambda config, batch_size, capacity: megalodon.init_cache(config, batch_size),
        parameter_count=lambda config: megalodon.parameter_breakdown(config)["total"],
        carries_state=True,
    ),
    "llama": Family(
        name="llama",
        config_class=llama.LlamaConfig,
        module_class=llama.LlamaLM,
        init_cache=llama.init_cache,
        parameter_count=lambda config: llama.parameter_breakdown(config)["total"],
        carries_state=False,
    ),
}
DEFAULT_FAMILY = "megalodon"


def get_family(name: str) -> Family:
    """The family called `name`.

    Raises:
        ConfigError: For an unknown name, listing the known ones.
    """
    if name not in FAMILIES:
        raise ConfigError(f"config.model_family must be one of {tuple(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def family_of_config(model_config: ModelConfig) -> Family:
    """The family of a model config object."""
    for family in FAMILIES.values():
        if isinstance(model_config, family.config_class):
            return family
    raise TypeError(f"not a model config: {type(model_config).__name__}")


def family_of_model(model: LanguageModel) -> Family:
    """The family of a language model module."""
    for family in FAMILIES.values():
        if isinstance(model, family.module_class):
            return family
    raise TypeError(f"model must be one of the families' LMs, got {type(model).__name__}")


def model_config_from(family: str, values: Mapping[str, Any]) -> ModelConfig:
    """Builds the validated model config of `family` from a mapping of its fields."""
    return get_family(family).config_class.from_mapping(values)


def build_model(model_config: ModelConfig) -> LanguageModel:
    """The language model module of a model config."""
    return family_of_config(model_config).module_class(model_config)


def closed_form_parameter_count(model_config: ModelConfig) -> int:
    """The parameter count implied by the config's sizes (checked against the built tree)."""
    return family_of_config(model_config).parameter_count(model_config)


def has_carried_state(model: LanguageModel) -> bool:
    """Whether the model carries unlimited context in a fixed-size state (stream evaluation)."""
    return family_of_model(model).carries_state


def decode_cache(model: LanguageModel, batch_size: int, capacity: int) -> Any:
    """The cache a decode starts from: None for a carried-state model (it builds its
    fixed-size state in the first cached call, on the fast vectorized path), else the
    family's empty cache of `capacity` positions per row (B = batch_size)."""
    family = family_of_model(model)
    if family.carries_state:
        return None
    return family.init_cache(model.config, batch_size, capacity)
