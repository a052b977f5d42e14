"""Tests of the configuration: parameter counts (spec §7, §10 item 26) and validation (§1.2).

Reference counts are the published numbers of the spec; the closed-form breakdown is also
checked against the scalar count of the actual Flax parameter tree (jax.eval_shape of init).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from megalodon_flax.config_base import ConfigError
from megalodon_flax.megalodon import MegalodonLM, count_params, parameter_breakdown, parameter_count
from megalodon_flax.megalodon.config import MegalodonConfig, enwik8_config


def tree_size(cfg: MegalodonConfig) -> int:
    """Number of scalars in the parameter tree of MegalodonLM(cfg), from shapes only."""
    model = MegalodonLM(cfg)
    shapes = jax.eval_shape(
        lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    )
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def param_shapes(cfg: MegalodonConfig) -> dict:
    model = MegalodonLM(cfg)
    return jax.eval_shape(
        lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    )["params"]


# ----------------------------------------------------------------------------- enwik8 (§7.2)
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, 11_277_696),  # HF topology, head tied because V_out == V
        ({"bias_topology": "upstream", "tie_policy": "explicit"}, 11_359_104),
        ({"tie_policy": "explicit"}, 11_376_000),  # HF topology untied
        ({"bias_topology": "upstream", "tie_policy": "explicit", "share_emb": True}, 11_260_800),
    ],
)
def test_enwik8_parameter_counts(overrides: dict, expected: int) -> None:
    """enwik8 totals of §7.2 from the formula and from the actual parameter tree."""
    cfg = enwik8_config(**overrides)
    assert parameter_breakdown(cfg)["total"] == expected
    assert tree_size(cfg) == expected


def test_enwik8_config_fields() -> None:
    cfg = enwik8_config()
    assert (cfg.vocab_size, cfg.model_dim, cfg.num_layers, cfg.num_heads) == (256, 384, 6, 3)
    assert (cfg.z_dim, cfg.value_dim, cfg.ffn_hidden_dim, cfg.cema_ndim) == (192, 384, 1024, 8)
    assert (cfg.chunk_size, cfg.norm_num_groups) == (256, 32)
    assert cfg.swiglu and not cfg.rescale_nffn and not cfg.scale_emb and not cfg.share_emb
    assert (cfg.head_dim, cfg.value_head_dim, cfg.output_width) == (64, 128, 256)
    assert cfg.tied


def test_enwik8_per_layer_breakdown() -> None:
    """Per-layer components of §7.2 (sum 1,863,104) and model-level parts."""
    cfg = enwik8_config()
    breakdown = parameter_breakdown(cfg)
    per_layer = {
        "timestep_norm": 768,
        "cema": 13_056,
        "rms_norm": 384,
        "projections": 665_280,
        "qk_affine": 768,
        "ffn_layer_norm": 768,
        "ffn": 1_182_080,
        "ffn_rescale": 0,
    }
    assert sum(per_layer.values()) == 1_863_104
    assert breakdown["per_layer"] == 1_863_104
    for name, count in per_layer.items():
        assert breakdown[name] == 6 * count, name
    assert breakdown["embedding"] == 98_304
    assert breakdown["final_norm"] == 768
    assert breakdown["lm_head"] == 0
    upstream = parameter_breakdown(enwik8_config(bias_topology="upstream", tie_policy="explicit"))
    assert upstream["per_layer"] == 1_860_288
    assert upstream["lm_head"] == 98_304


def test_enwik8_tree_shapes_match_hf_table() -> None:
    """Every tensor of one layer has the (transposed) shape of the §7.2 HF table."""
    layer = param_shapes(enwik8_config())["model"]["layers_3"]
    attn, ffn = layer["attn"], layer["ffn"]
    expected = {
        ("timenorm", "weight"): (384,),
        ("timenorm", "bias"): (384,),
        ("cema", "alpha"): (384, 8, 1),
        ("cema", "delta"): (384, 8, 1),
        ("cema", "theta"): (384, 1, 1),
        ("cema", "gamma_real"): (384, 8),
        ("cema", "gamma_imag"): (384, 8),
        ("cema", "omega"): (384,),
        ("rmsnorm", "gamma"): (384,),
        ("wz", "kernel"): (384, 192),
        ("wz", "bias"): (192,),
        ("wv", "kernel"): (384, 384),
        ("wr", "kernel"): (384, 384),
        ("wh1", "kernel"): (384, 384),
        ("wh2", "kernel"): (384, 384),
        ("wh2", "bias"): (384,),
    }
    for (module, name), shape in expected.items():
        assert attn[module][name].shape == shape, (module, name)
    assert attn["gamma"].shape == (2, 192) and attn["beta"].shape == (2, 192)
    assert ffn["norm"]["weight"].shape == (384,) and ffn["norm"]["bias"].shape == (384,)
    assert ffn["fc1"]["kernel"].shape == (384, 1024) and ffn["fc1"]["bias"].shape == (1024,)
    assert ffn["fc3"]["kernel"].shape == (384, 1024) and ffn["fc3"]["bias"].shape == (1024,)
    assert ffn["fc2"]["kernel"].shape == (1024, 384) and ffn["fc2"]["bias"].shape == (384,)
    assert "alpha" not in ffn


# ----------------------------------------------------------------------------- presets (§7.3)
PRESETS = {
    "mega200M": (dict(num_layers=12, model_dim=1024, num_heads=1, z_dim=256, value_dim=2048,
                      ffn_hidden_dim=2560, norm_num_groups=32), 220_627_968),
    "mega1.3B": (dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096,
                      ffn_hidden_dim=4864, norm_num_groups=64), 1_342_832_640),
    "mega1.3B_pg19": (dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512,
                           value_dim=4096, ffn_hidden_dim=3584, norm_num_groups=64, swiglu=True,
                           scale_emb=True, share_emb=True), 1_327_628_288),
    "mega7.1B": (dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192,
                      ffn_hidden_dim=11264, norm_num_groups=64), 7_117_381_632),
    "mega7.3B": (dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192,
                      ffn_hidden_dim=8192, norm_num_groups=64, swiglu=True), 7_385_817_088),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PRESETS))
def test_upstream_preset_counts(name: str) -> None:
    """Upstream topology + explicit tying reproduces the published preset counts (V=32000)."""
    fields, expected = PRESETS[name]
    cfg = MegalodonConfig(
        vocab_size=32000,
        cema_ndim=16,
        chunk_size=2048,
        bias_topology="upstream",
        tie_policy="explicit",
        **fields,
    )
    assert parameter_breakdown(cfg)["total"] == expected


def test_paper_7b_count() -> None:
    """The paper's 7B (mega7.3B with C=4096, rope_base=1e5) has the mega7.3B count."""
    fields, expected = PRESETS["mega7.3B"]
    cfg = MegalodonConfig(
        vocab_size=32000,
        cema_ndim=16,
        chunk_size=4096,
        rope_base=1e5,
        bias_topology="upstream",
        tie_policy="explicit",
        **fields,
    )
    assert parameter_breakdown(cfg)["total"] == expected


def test_hf_readme_example_count() -> None:
    """HF README example (V=32000, D=512, 8 layers, H=8, other defaults) = 66,034,688."""
    cfg = MegalodonConfig(vocab_size=32000, model_dim=512, num_layers=8, num_heads=8)
    assert cfg.tied
    assert parameter_breakdown(cfg)["total"] == 66_034_688


# ----------------------------------------------------------------------------- formula vs tree
SMALL = dict(
    vocab_size=40,
    model_dim=16,
    num_layers=2,
    num_heads=2,
    z_dim=8,
    value_dim=12,
    ffn_hidden_dim=20,
    cema_ndim=3,
    chunk_size=4,
    norm_num_groups=4,
)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"swiglu": True},
        {"rescale_nffn": True},
        {"norm_affine": False},
        {"bias_topology": "upstream"},
        {"bias_topology": "upstream", "swiglu": True, "rescale_nffn": True},
        {"tie_policy": "explicit"},
        {"output_size": 24},
        {"bias_topology": "upstream", "output_size": 50, "norm_affine": False},
        {"tie_policy": "explicit", "share_emb": True, "num_layers": 3},
        {"param_dtype": "bfloat16", "swiglu": True},
    ],
)
def test_formula_matches_parameter_tree(overrides: dict) -> None:
    """parameter_breakdown == scalar count of the real tree, and the tree has exactly the
    optional parts the config asks for."""
    cfg = MegalodonConfig(**{**SMALL, **overrides})
    shapes = param_shapes(cfg)
    total = int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))
    breakdown = parameter_breakdown(cfg)
    assert breakdown["total"] == total
    assert count_params({"params": shapes}) == total
    assert parameter_count(cfg, {"params": shapes})["total"] == total
    ffn = shapes["model"]["layers_0"]["ffn"]
    attn = shapes["model"]["layers_0"]["attn"]
    assert ("fc3" in ffn) == cfg.swiglu
    assert ("alpha" in ffn) == cfg.rescale_nffn
    assert ("rmsnorm" in attn) == cfg.norm_affine
    assert ("norm" in ffn) == cfg.norm_affine
    assert "timenorm" in attn  # TimestepNorm is always affine
    for name in ("wz", "wv", "wr", "wh1", "wh2", "fc1", "fc2"):
        has_bias = "bias" in {**attn, **ffn}[name]
        assert has_bias == cfg.linear_has_bias(name), name
    assert ("lm_head" in shapes) == (not cfg.tied)
    if not cfg.tied:
        assert shapes["lm_head"]["kernel"].shape == (cfg.model_dim, cfg.output_width)
        assert breakdown["lm_head"] == cfg.model_dim * cfg.output_width


def test_parameter_count_detects_mismatch() -> None:
    """parameter_count refuses a tree that does not match the config."""
    cfg = MegalodonConfig(**SMALL)
    wrong = {"params": param_shapes(cfg.replace(swiglu=True))}
    with pytest.raises(AssertionError):
        parameter_count(cfg, wrong)


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
