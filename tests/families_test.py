"""Tests of the model-family registry (megalodon_flax.families) through the training config.

Oracles: the Llama model and its closed-form count selected by `model_family`, and the
expected validation messages for a family without carried state, an unknown family and a
model section of the wrong family.
"""

from __future__ import annotations

import pytest

from megalodon_flax import families
from megalodon_flax.config_base import ConfigError
from megalodon_flax.llama import LlamaConfig, LlamaLM, parameter_breakdown
from megalodon_flax.training.config import TrainConfig
from tests.factories import tiny_llama_train_mapping


def test_training_config_family_selects_the_model(enwik8_data) -> None:
    d = tiny_llama_train_mapping(data=enwik8_data)
    config = TrainConfig.from_mapping(d)
    assert config.model == LlamaConfig(**d["model"])
    assert isinstance(families.build_model(config.model), LlamaLM)
    assert (
        families.closed_form_parameter_count(config.model)
        == parameter_breakdown(config.model)["total"]
    )
    d["eval"]["mode"] = "stream"
    with pytest.raises(ConfigError, match=r"config.eval.mode='stream' needs .*carried state"):
        TrainConfig.from_mapping(d)
    d["eval"]["mode"] = "window"
    d["model_family"] = "gpt"
    with pytest.raises(ConfigError, match=r"config\.model_family must be one of"):
        TrainConfig.from_mapping(d)
    d["model_family"] = "llama"
    d["model"]["z_dim"] = 8  # a Megalodon field
    with pytest.raises(ConfigError, match=r"config.model: .*\['z_dim'\]"):
        TrainConfig.from_mapping(d)
