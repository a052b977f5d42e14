"""Tests of `LlamaConfig` and the Llama parameter count (megalodon_flax.llama.config,
param_count).

Oracles: the closed-form count against the leaves of an abstract initialization, and the
expected validation messages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from megalodon_flax.config_base import ConfigError
from megalodon_flax.llama import LlamaConfig, LlamaLM, parameter_breakdown
from megalodon_flax.megalodon import count_params
from tests.factories import tiny_llama_config


def test_enwik8_baseline_size_matches_the_closed_form() -> None:
    config = LlamaConfig()
    model = LlamaLM(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    built = count_params(shapes["params"])
    assert built == parameter_breakdown(config)["total"] == 12_489_600
    assert (config.model_dim, config.num_layers, config.num_heads, config.head_dim) == (
        384,
        6,
        6,
        64,
    )


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_heads", 5, "divisible"),
        ("model_dim", 30, "must be even"),
        ("compute_dtype", "float16", "float16 is not supported"),
        ("dropout", 1.0, r"\[0, 1\)"),
        ("rope_base", -1.0, "positive"),
    ],
)
def test_invalid_config_values_raise(field, value, match) -> None:
    kwargs = {"num_heads": 6} if field == "model_dim" else {}
    with pytest.raises(ConfigError, match=match):
        tiny_llama_config(**{field: value, **kwargs})
