"""Tests of the parameter counts (spec §7, §10 item 26): the closed-form breakdown of
`megalodon_flax.megalodon.param_count` and `count_params` of a tree.

Reference counts are the published numbers of the spec; the closed-form breakdown is also
checked against the scalar count of the actual Flax parameter tree (jax.eval_shape of init).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from megalodon_flax.megalodon import MegalodonLM, count_params, parameter_breakdown, parameter_count
from megalodon_flax.megalodon.config import MegalodonConfig, enwik8_config
from tests.factories import tiny_megalodon_config


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


# The small config of the tree checks (odd sizes: V=40, E=12, N=3, C=4).
small_config = functools.partial(
    tiny_megalodon_config,
    vocab_size=40,
    model_dim=16,
    z_dim=8,
    value_dim=12,
    ffn_hidden_dim=20,
    cema_ndim=3,
    chunk_size=4,
)


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
    cfg = small_config(**overrides)
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
    cfg = small_config()
    wrong = {"params": param_shapes(cfg.replace(swiglu=True))}
    with pytest.raises(AssertionError):
        parameter_count(cfg, wrong)
