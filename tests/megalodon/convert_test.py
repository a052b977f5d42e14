"""PyTorch state-dict conversion: round trips, the exact HF key list, errors, files, parity.

Oracles: bit-exact round trips through both formats, the spec §8.1 key list written out by
hand, the half-split RoPE model as a second code path for the Z permutation, and
megalodon-jax's own strict upstream loader (an external implementation, through
`tests/reference/megalodon_jax_bridge.py`).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from megalodon_flax import MegalodonConfig, MegalodonLM, enwik8_config
from megalodon_flax.megalodon.convert import (
    ConversionError,
    from_state_dict,
    load_state_dict,
    save_state_dict,
    to_state_dict,
)
from megalodon_flax.megalodon.state_dict_layout import expected_shapes
from tests.factories import tiny_megalodon_config
from tests.reference import megalodon_jax_bridge

# The tiny config of these tests: V=61 (no power of two), F=48, SwiGLU.
small_config = functools.partial(
    tiny_megalodon_config, vocab_size=61, ffn_hidden_dim=48, swiglu=True
)


def _random_state_dict(config: MegalodonConfig, fmt: str, seed: int = 0) -> dict:
    """A random state dict of the right keys/shapes; LayerNorm weights near 1 as trained."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in expected_shapes(config, fmt).items():
        if key.endswith("prior_count"):
            out[key] = np.zeros((), np.int64)
        elif "prior_" in key:
            out[key] = np.zeros(shape, np.float32)
        elif key == "rope.freqs":
            dh = config.head_dim
            out[key] = (10000.0 ** (-np.arange(0, dh, 2, dtype=np.float32) / dh)).astype(np.float32)
        elif fmt == "hf" and key.endswith("ffn.norm.weight"):
            out[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[key] = rng.standard_normal(shape).astype(np.float32)
    for fmt_pair in (
        ("model.embed.weight", "lm_head.weight"),
        ("embed.weight", "output.output.weight"),
    ):
        if config.tied and fmt_pair[1] in out:
            out[fmt_pair[1]] = out[fmt_pair[0]].copy()
    return out


def _logits(config: MegalodonConfig, params, tokens) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        logits, _ = MegalodonLM(config).apply({"params": params}, jnp.asarray(tokens))
    return np.asarray(logits)


def _assert_bit_exact(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert np.array_equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"swiglu": False, "rescale_nffn": False, "output_size": 70},
        {"norm_affine": False},
    ],
)
def test_hf_round_trip_is_bit_exact(overrides):
    config = small_config(**overrides)
    sd = _random_state_dict(config, "hf", seed=1)
    params = from_state_dict(sd, config, "hf")
    _assert_bit_exact(sd, to_state_dict(params, config, "hf"))


@pytest.mark.parametrize("tied", [False, True])
def test_upstream_round_trip_is_bit_exact(tied):
    config = small_config(
        bias_topology="upstream", tie_policy="explicit", share_emb=tied, rescale_nffn=True
    )
    sd = _random_state_dict(config, "upstream", seed=2)
    params = from_state_dict(sd, config, "upstream")
    _assert_bit_exact(sd, to_state_dict(params, config, "upstream"))


def test_imported_tree_matches_the_model_tree():
    """The imported tree has exactly the structure, shapes and dtypes `init` creates."""
    for fmt, config in (
        ("hf", small_config(param_dtype="bfloat16")),
        ("upstream", small_config(bias_topology="upstream", tie_policy="explicit")),
    ):
        params = from_state_dict(_random_state_dict(config, fmt), config, fmt)
        init = jax.eval_shape(
            lambda c=config: MegalodonLM(c).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        )
        init = jax.tree.map(lambda x: (x.shape, x.dtype), __import__("flax").linen.unbox(init))
        ours = jax.tree.map(lambda x: (x.shape, x.dtype), params)
        assert ours == init["params"]


def test_enwik8_hf_export_has_exactly_the_spec_keys():
    """Key list and shapes of spec §8.1 for the enwik8 config (tied head, swiglu, HF biases)."""
    config = enwik8_config()
    d, z, e, f, n = 384, 192, 384, 1024, 8
    expected = {"model.embed.weight": (256, d)}
    for i in range(6):
        p = f"model.layers.{i}."
        expected.update(
            {
                p + "attn.timenorm.weight": (d,),
                p + "attn.timenorm.bias": (d,),
                p + "attn.cema.alpha": (d, n, 1),
                p + "attn.cema.delta": (d, n, 1),
                p + "attn.cema.theta": (d, 1, 1),
                p + "attn.cema.gamma_real": (d, n),
                p + "attn.cema.gamma_imag": (d, n),
                p + "attn.cema.omega": (d,),
                p + "attn.rmsnorm.gamma": (d,),
                p + "attn.wz.weight": (z, d),
                p + "attn.wz.bias": (z,),
                p + "attn.wv.weight": (e, d),
                p + "attn.wv.bias": (e,),
                p + "attn.wr.weight": (e, d),
                p + "attn.wr.bias": (e,),
                p + "attn.wh1.weight": (d, d),
                p + "attn.wh1.bias": (d,),
                p + "attn.wh2.weight": (d, e),
                p + "attn.wh2.bias": (d,),
                p + "attn.gamma": (2, z),
                p + "attn.beta": (2, z),
                p + "ffn.norm.weight": (d,),
                p + "ffn.norm.bias": (d,),
                p + "ffn.fc1.weight": (f, d),
                p + "ffn.fc1.bias": (f,),
                p + "ffn.fc2.weight": (d, f),
                p + "ffn.fc2.bias": (d,),
                p + "ffn.fc3.weight": (f, d),
                p + "ffn.fc3.bias": (f,),
            }
        )
    expected.update(
        {"model.norm.weight": (d,), "model.norm.bias": (d,), "lm_head.weight": (256, d)}
    )
    params = jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype),
        jax.eval_shape(
            lambda: MegalodonLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        ),
    )
    sd = to_state_dict(__import__("flax").linen.unbox(params)["params"], config, "hf")
    assert {k: v.shape for k, v in sd.items()} == expected
    assert all(v.dtype == np.float32 for v in sd.values())
    assert sum(v.size for k, v in sd.items() if k != "lm_head.weight") == 11_277_696
    # The FFN LayerNorm is exported as a direct scale: stored 0 -> weight 1.
    assert np.all(sd["model.layers.0.ffn.norm.weight"] == 1.0)
    np.testing.assert_array_equal(sd["lm_head.weight"], sd["model.embed.weight"])


def test_hf_half_split_weights_give_the_same_logits_as_the_permuted_import():
    """Importing HF weights into the adjacent-RoPE model (permuting Z) equals running them
    unpermuted through the half-split RoPE layout: two independent code paths."""
    adjacent = small_config()
    half = small_config(rope_layout="half_split")
    sd = _random_state_dict(adjacent, "hf", seed=3)
    for key in sd:  # keep logits in a sane range
        if not key.endswith("ffn.norm.weight"):
            sd[key] = (0.3 * sd[key]).astype(np.float32)
    tokens = np.random.default_rng(0).integers(0, 61, (2, 19))
    a = _logits(adjacent, from_state_dict(sd, adjacent, "hf"), tokens)
    b = _logits(half, from_state_dict(sd, half, "hf"), tokens)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    p_adj = from_state_dict(sd, adjacent, "hf")["model"]["layers_0"]["attn"]["wz"]["kernel"]
    p_half = from_state_dict(sd, half, "hf")["model"]["layers_0"]["attn"]["wz"]["kernel"]
    assert not np.array_equal(p_adj, p_half)


def test_loading_lists_every_problem_at_once():
    config = small_config()
    sd = _random_state_dict(config, "hf")
    del sd["model.layers.0.attn.wz.bias"]
    sd["model.layers.1.attn.extra"] = np.zeros(3, np.float32)
    sd["model.layers.0.attn.wv.weight"] = np.zeros((5, 5), np.float32)
    sd["model.layers.1.ffn.fc1.bias"] = sd["model.layers.1.ffn.fc1.bias"].astype(np.float16)
    with pytest.raises(ConversionError) as info:
        from_state_dict(sd, config, "hf")
    message = str(info.value)
    assert "missing: model.layers.0.attn.wz.bias" in message
    assert "unexpected: model.layers.1.attn.extra" in message
    assert re.search(r"shape mismatch: model\.layers\.0\.attn\.wv\.weight has \(5, 5\)", message)
    assert "dtype mismatch: model.layers.1.ffn.fc1.bias is float16" in message
    assert "4 problem(s)" in message


def test_tied_heads_either_key_and_mismatch():
    config = small_config()
    sd = _random_state_dict(config, "hf")
    full = from_state_dict(sd, config, "hf")
    for dropped in ("lm_head.weight", "model.embed.weight"):
        partial = {k: v for k, v in sd.items() if k != dropped}
        got = from_state_dict(partial, config, "hf")
        np.testing.assert_array_equal(
            got["model"]["embed"]["embedding"], full["model"]["embed"]["embedding"]
        )
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(ConversionError, match=r"differs from model\.embed\.weight"):
        from_state_dict(sd, config, "hf")
    untied = small_config(tie_policy="explicit")
    params = from_state_dict(sd, untied, "hf")
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    with pytest.raises(ConversionError, match="ties the LM head"):
        to_state_dict(params, untied, "hf")


def test_lossy_exports_are_refused_and_zero_biases_accepted():
    hf_topology = small_config(tie_policy="explicit", output_size=70)
    sd = _random_state_dict(hf_topology, "hf")
    params = from_state_dict(sd, hf_topology, "hf")
    with pytest.raises(ConversionError, match="wh2/bias"):
        to_state_dict(params, hf_topology, "upstream")
    for key in list(sd):
        if re.search(r"(wh2|fc\d)\.bias$", key):
            sd[key] = np.zeros_like(sd[key])
    up = to_state_dict(from_state_dict(sd, hf_topology, "hf"), hf_topology, "upstream")
    assert not any(re.search(r"(wh2|fc\d)\.bias$", k) for k in up)
    upstream_cfg = small_config(output_size=70, bias_topology="upstream", tie_policy="explicit")
    back = from_state_dict(up, upstream_cfg, "upstream")
    _assert_bit_exact(up, to_state_dict(back, upstream_cfg, "upstream"))
    sd["model.layers.0.ffn.fc1.bias"][0] = 1.0
    with pytest.raises(ConversionError, match="non-zero"):
        from_state_dict(sd, upstream_cfg, "hf")


def test_bf16_export_keeps_sensitive_parameters_fp32(tmp_path):
    config = small_config(rescale_nffn=True, bias_topology="upstream")
    params = from_state_dict(_random_state_dict(config, "upstream"), config, "upstream")
    sd = to_state_dict(params, config, "upstream", dtype="bfloat16")
    for key, value in sd.items():
        sensitive = any(
            s in key for s in ("cema", "timenorm", "rmsnorm", "norm.", "gamma", "beta", "alpha")
        ) or key in ("rope.freqs",)
        if key.endswith("prior_count"):
            assert value.dtype == np.int64
        elif sensitive:
            assert value.dtype == np.float32, key
        else:
            assert value.dtype == ml_dtypes.bfloat16, key
    path = str(tmp_path / "model.safetensors")
    save_state_dict(sd, path)
    loaded = load_state_dict(path)
    _assert_bit_exact(sd, loaded)
    again = from_state_dict(loaded, config, "upstream")
    kernel = again["model"]["layers_0"]["attn"]["wz"]["kernel"]
    expected = params["model"]["layers_0"]["attn"]["wz"]["kernel"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(kernel, expected.astype(np.float32))


def test_torch_files_load_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    config = small_config()
    sd = _random_state_dict(config, "hf")
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    tensors["model.layers.0.attn.wv.weight"] = tensors["model.layers.0.attn.wv.weight"].bfloat16()
    path = str(tmp_path / "model.bin")
    torch.save(tensors, path)
    loaded = load_state_dict(path)
    assert loaded["model.layers.0.attn.wv.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        loaded["model.layers.0.attn.wv.weight"].astype(np.float32),
        tensors["model.layers.0.attn.wv.weight"].float().numpy(),
    )
    from_state_dict(loaded, config, "hf")


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_state_dict(str(tmp_path / "absent.safetensors"))
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported checkpoint extension"):
        load_state_dict(str(tmp_path / "x.ckpt"))


@pytest.mark.slow
def test_upstream_export_loads_in_megalodon_jax_with_equal_logits():
    """External oracle: megalodon-jax's own strict upstream loader reads our export."""
    pytest.importorskip("megalodon_jax")
    torch = pytest.importorskip("torch")
    import equinox as eqx
    from megalodon_jax.convert import load_upstream_state_dict

    config = small_config(chunk_size=16, bias_topology="upstream", tie_policy="explicit")
    model = MegalodonLM(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = __import__("flax").linen.unbox(params)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    sd = to_state_dict(params, config, "upstream")
    theirs = megalodon_jax_bridge.skeleton(config)
    theirs = load_upstream_state_dict(theirs, {k: torch.from_numpy(v) for k, v in sd.items()})
    tokens = np.random.default_rng(4).integers(0, 61, (2, 32))  # two chunks
    with jax.default_matmul_precision("highest"):
        their_logits, _ = eqx.filter_jit(lambda m, t: m(t))(theirs, jnp.asarray(tokens))
    np.testing.assert_allclose(
        _logits(config, params, tokens), np.asarray(their_logits), atol=1e-4, rtol=0
    )
