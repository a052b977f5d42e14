"""Tests of `MegalodonConfig`: validation (spec §1.2), derived fields, tying, `from_mapping`.

Oracle: the rules of the spec, case by case (each invalid value names its field).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import pytest

from megalodon_flax.config_base import ConfigError
from megalodon_flax.megalodon.config import MegalodonConfig
from tests.factories import tiny_megalodon_fields

# The fields of a small valid config: odd sizes (V=40, E=12, N=3, C=4) catch mixed-up fields.
SMALL = tiny_megalodon_fields(
    vocab_size=40, model_dim=16, z_dim=8, value_dim=12, ffn_hidden_dim=20, cema_ndim=3, chunk_size=4
)


def test_bias_topology() -> None:
    hf = MegalodonConfig(**SMALL)
    upstream = MegalodonConfig(**SMALL, bias_topology="upstream")
    for name in ("wz", "wv", "wr", "wh1", "wh2", "fc1", "fc2", "fc3"):
        assert hf.linear_has_bias(name)
    assert [n for n in ("wz", "wv", "wr", "wh1", "wh2", "fc1", "fc2", "fc3")
            if upstream.linear_has_bias(n)] == ["wz", "wv", "wr", "wh1"]  # fmt: skip


# ----------------------------------------------------------------------------- validation
POSITIVE_FIELDS = [
    "vocab_size",
    "model_dim",
    "num_layers",
    "num_heads",
    "z_dim",
    "value_dim",
    "ffn_hidden_dim",
    "cema_ndim",
    "chunk_size",
    "norm_num_groups",
]


def test_valid_config_builds() -> None:
    cfg = MegalodonConfig(**SMALL)
    assert cfg.head_dim == 4 and cfg.value_head_dim == 6
    assert cfg.effective_rope_base == 10000.0
    assert cfg.replace(rope_base=5e5).effective_rope_base == 5e5
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model_dim = 32  # type: ignore[misc]
    assert hash(cfg) == hash(MegalodonConfig(**SMALL))


@pytest.mark.parametrize("field", POSITIVE_FIELDS)
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes_rejected(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=field):
        MegalodonConfig(**{**SMALL, field: value})


@pytest.mark.parametrize("field", ["num_layers", "model_dim", "chunk_size"])
@pytest.mark.parametrize("value", [2.0, True, "4"])
def test_non_integer_sizes_rejected(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        MegalodonConfig(**{**SMALL, field: value})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"z_dim": 10, "num_heads": 4}, "z_dim"),  # 10 % 4 != 0
        ({"z_dim": 12, "num_heads": 4}, "z_dim"),  # head width 3 is odd
        ({"z_dim": 6, "num_heads": 1}, None),  # head width 6 is fine
        ({"value_dim": 10, "num_heads": 4, "z_dim": 8}, "value_dim"),
        ({"model_dim": 18, "norm_num_groups": 4}, "norm_num_groups"),
        ({"model_dim": 18, "norm_num_groups": 4}, "model_dim"),
    ],
)
def test_divisibility_rules(changes: dict, field: str | None) -> None:
    if field is None:
        MegalodonConfig(**{**SMALL, **changes})
        return
    with pytest.raises(ConfigError, match=field):
        MegalodonConfig(**{**SMALL, **changes})


def test_odd_head_width_message_mentions_even() -> None:
    with pytest.raises(ConfigError, match="even"):
        MegalodonConfig(**{**SMALL, "z_dim": 6, "num_heads": 2})


@pytest.mark.parametrize("field", ["dropout", "attention_dropout", "hidden_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        MegalodonConfig(**{**SMALL, field: value})


@pytest.mark.parametrize("field", ["dropout", "attention_dropout", "hidden_dropout"])
def test_dropout_in_range_accepted(field: str) -> None:
    for value in (0.0, 0.5, 0.999):
        assert getattr(MegalodonConfig(**{**SMALL, field: value}), field) == value


@pytest.mark.parametrize(
    "field",
    ["init_mode", "bias_topology", "tie_policy", "timestep_norm_variant", "rope_layout",
     "cema_path"],
)  # fmt: skip
def test_unknown_enum_values(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MegalodonConfig(**{**SMALL, field: "bogus"})


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("init_mode", ["he", "bert", "gaussian", "xavier"]),
        ("bias_topology", ["hf", "upstream"]),
        ("tie_policy", ["hf", "explicit"]),
        ("timestep_norm_variant", ["upstream", "hf"]),
        ("rope_layout", ["adjacent", "half_split"]),
        ("cema_path", ["fft", "scan", "sequential"]),
        ("param_dtype", ["float32", "bfloat16"]),
        ("compute_dtype", ["float32", "bfloat16"]),
    ],
)
def test_known_enum_values_accepted(field: str, values: list[str]) -> None:
    for value in values:
        assert getattr(MegalodonConfig(**{**SMALL, field: value}), field) == value


@pytest.mark.parametrize("field", ["param_dtype", "compute_dtype"])
@pytest.mark.parametrize("value", ["float16", "fp16", "half"])
def test_float16_rejected(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        MegalodonConfig(**{**SMALL, field: value})
    assert "float16" in str(info.value)


@pytest.mark.parametrize("field", ["param_dtype", "compute_dtype"])
def test_unknown_dtype_rejected(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MegalodonConfig(**{**SMALL, field: "float64"})


@pytest.mark.parametrize("value", [0.0, -1e-5, float("inf"), float("nan")])
def test_bad_norm_eps(value: float) -> None:
    with pytest.raises(ConfigError, match="norm_eps"):
        MegalodonConfig(**{**SMALL, "norm_eps": value})


@pytest.mark.parametrize("value", [0.0, -10.0, float("inf"), float("nan")])
def test_bad_rope_base(value: float) -> None:
    with pytest.raises(ConfigError, match="rope_base"):
        MegalodonConfig(**{**SMALL, "rope_base": value})


@pytest.mark.parametrize("value", [0, -2, -100])
def test_bad_output_size(value: int) -> None:
    with pytest.raises(ConfigError, match="output_size"):
        MegalodonConfig(**{**SMALL, "output_size": value})


def test_output_size_and_tying() -> None:
    cfg = MegalodonConfig(**SMALL, output_size=24)
    assert cfg.output_width == 24 and not cfg.tied
    assert MegalodonConfig(**SMALL, output_size=40).tied  # == vocab_size under the HF policy
    assert not MegalodonConfig(**SMALL, tie_policy="explicit").tied
    assert MegalodonConfig(**SMALL, tie_policy="explicit", share_emb=True).tied
    assert MegalodonConfig(**SMALL, share_emb=True).tied
    with pytest.raises(ConfigError, match="share_emb"):
        MegalodonConfig(**SMALL, output_size=24, share_emb=True)


# ----------------------------------------------------------------------------- from_mapping
def test_from_mapping_with_config_dict() -> None:
    """A ConfigDict (or dict) builds the same config; unknown keys are named in the error."""
    cfg = MegalodonConfig(**SMALL, swiglu=True, rope_base=1e5)
    round_trip = MegalodonConfig.from_mapping(ml_collections.ConfigDict(cfg.to_dict()))
    assert round_trip == cfg
    assert MegalodonConfig.from_mapping(dict(SMALL)) == MegalodonConfig(**SMALL)
    frozen = ml_collections.FrozenConfigDict(dict(SMALL))
    assert MegalodonConfig.from_mapping(frozen) == MegalodonConfig(**SMALL)
    bad = ml_collections.ConfigDict({**SMALL, "num_attention_heads": 2, "layerwise_ckpt": True})
    with pytest.raises(ConfigError) as info:
        MegalodonConfig.from_mapping(bad)
    assert "num_attention_heads" in str(info.value) and "layerwise_ckpt" in str(info.value)


def test_from_mapping_validates_values() -> None:
    with pytest.raises(ConfigError, match="z_dim"):
        MegalodonConfig.from_mapping(ml_collections.ConfigDict({**SMALL, "z_dim": 7}))


def test_config_dict_placeholder_fields_round_trip() -> None:
    """rope_base None and a float both survive the ConfigDict round trip."""
    for rope_base in (None, 2.5e4):
        cfg = MegalodonConfig(**SMALL, rope_base=rope_base)
        cd = ml_collections.ConfigDict(cfg.to_dict())
        assert MegalodonConfig.from_mapping(cd) == cfg
    assert np.isclose(MegalodonConfig(**SMALL, rope_base=2.5e4).effective_rope_base, 2.5e4)
