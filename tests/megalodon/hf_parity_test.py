"""Logits parity with megalodon-hf through the checkpoint conversion.

megalodon-hf (PyTorch) is not installable here, so the oracle is `hf_reference`
(`tests/reference/hf_reference.py`), a float64 NumPy transcription of its forward pass that
reads the HF state-dict keys directly (direct LayerNorm scale, half-split RoPE with absolute
positions, HF TimestepNorm statistics, CEMA fed the padded positions, tied head). A random HF
state dict is loaded into our model with `convert.from_state_dict(sd, hf_compatible(config),
"hf")` and our float32 logits (matmul precision HIGHEST) are compared with the oracle: several
chunks plus a partial one, right padding, a streaming split through our cache, and the
upstream semantics as a negative control. Runtime: about 25 s on 2 CPU cores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.megalodon.cache import init_cache
from megalodon_flax.megalodon.config import MegalodonConfig, hf_compatible
from megalodon_flax.megalodon.convert import from_state_dict
from megalodon_flax.megalodon.model import MegalodonLM
from tests.factories import tiny_megalodon_fields
from tests.reference import hf_reference

ATOL = 1e-4
# The fields of these tests (also the oracle's config mapping): V=53, F=48, SwiGLU.
SMALL = tiny_megalodon_fields(vocab_size=53, ffn_hidden_dim=48, swiglu=True)
LENGTH = 2 * SMALL["chunk_size"] + 3  # two full chunks and a partial one
BATCH = 2


def hf_state_dict(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A random megalodon-hf `MegalodonForCausalLM.state_dict()` (keys of spec §8.1).

    Weights are scaled so that logits are O(1); every norm affine, the Q/K gamma/beta, the
    biases and gamma_imag are non-zero; LayerNorm weights (direct scale) are near 1.
    """
    rng = np.random.default_rng(seed)
    v, d, z = cfg["vocab_size"], cfg["model_dim"], cfg["z_dim"]
    e, f, n = cfg["value_dim"], cfg["ffn_hidden_dim"], cfg["cema_ndim"]

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    def linear(prefix: str, out_dim: int, in_dim: int) -> None:
        sd[f"{prefix}.weight"] = normal((out_dim, in_dim), 1.0 / math.sqrt(in_dim))
        sd[f"{prefix}.bias"] = normal((out_dim,), 0.1)

    sd: dict[str, np.ndarray] = {"model.embed.weight": normal((v, d), 0.25)}
    for i in range(cfg["num_layers"]):
        a = f"model.layers.{i}.attn"
        sd[f"{a}.timenorm.weight"] = normal((d,), 0.2)
        sd[f"{a}.timenorm.bias"] = normal((d,), 0.2)
        sd[f"{a}.cema.alpha"] = normal((d, n, 1), 0.5)
        sd[f"{a}.cema.delta"] = normal((d, n, 1), 0.5)
        sd[f"{a}.cema.theta"] = normal((d, 1, 1), 1.0)
        sd[f"{a}.cema.gamma_real"] = normal((d, n), 1.0)
        sd[f"{a}.cema.gamma_imag"] = normal((d, n), 1.0)
        sd[f"{a}.cema.omega"] = rng.uniform(-0.5, 0.5, (d,)).astype(np.float32)
        sd[f"{a}.rmsnorm.gamma"] = normal((d,), 0.2)
        linear(f"{a}.wz", z, d)
        linear(f"{a}.wv", e, d)
        linear(f"{a}.wr", e, d)
        linear(f"{a}.wh1", d, d)
        linear(f"{a}.wh2", d, e)
        sd[f"{a}.gamma"] = normal((2, z), 0.5)
        sd[f"{a}.beta"] = normal((2, z), 0.2)
        m = f"model.layers.{i}.ffn"
        sd[f"{m}.norm.weight"] = normal((d,), 0.1, mean=1.0)
        sd[f"{m}.norm.bias"] = normal((d,), 0.1)
        linear(f"{m}.fc1", f, d)
        linear(f"{m}.fc3", f, d)
        linear(f"{m}.fc2", d, f)
    sd["model.norm.weight"] = normal((d,), 0.2)
    sd["model.norm.bias"] = normal((d,), 0.2)
    sd["lm_head.weight"] = sd["model.embed.weight"].copy()  # tied: same storage in HF
    return sd


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return hf_state_dict(SMALL)


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, SMALL["vocab_size"], (BATCH, LENGTH))


@pytest.fixture(scope="module")
def oracle(state_dict, tokens) -> np.ndarray:
    return hf_reference.hf_forward(state_dict, SMALL, tokens)


def _config(rope_layout: str = "adjacent", **overrides) -> MegalodonConfig:
    """HF-compatible semantics (then `overrides`) on the SMALL sizes."""
    return hf_compatible(MegalodonConfig(**SMALL, rope_layout=rope_layout)).replace(**overrides)


def _logits(config, params, tokens, cache=None, attention_mask=None):
    with jax.default_matmul_precision("highest"):
        logits, cache = MegalodonLM(config).apply(
            {"params": params},
            jnp.asarray(tokens, jnp.int32),
            cache=cache,
            attention_mask=None if attention_mask is None else jnp.asarray(attention_mask),
        )
    return np.asarray(logits, np.float64), cache


def _right_padding_mask(valid_lengths: list[int]) -> np.ndarray:
    return np.arange(LENGTH)[None, :] < np.asarray(valid_lengths)[:, None]


def test_oracle_logits_are_order_one(oracle):
    """The random weights give logits in a range where atol 1e-4 is a real test."""
    assert np.all(np.isfinite(oracle))
    assert 0.3 < oracle.std() < 10.0


@pytest.mark.parametrize(
    ("rope_layout", "scan_layers"),
    [("adjacent", False), ("half_split", False), ("adjacent", True)],
)
def test_logits_match_hf_over_several_chunks(state_dict, tokens, oracle, rope_layout, scan_layers):
    """L = 2C+3, no padding: 'adjacent' permutes Z at conversion, 'half_split' does not;
    with scanned layers the conversion stacks the blocks."""
    config = _config(rope_layout, scan_layers=scan_layers)
    params = from_state_dict(state_dict, config, "hf")
    ours, _ = _logits(config, params, tokens)
    np.testing.assert_allclose(ours, oracle, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "valid_lengths",
    [
        pytest.param([LENGTH, 2 * SMALL["chunk_size"] + 1], id="pad_inside_last_chunk"),
        pytest.param([LENGTH - 1, SMALL["chunk_size"] + 5], id="last_chunk_all_padding"),
    ],
)
def test_right_padding_matches_hf(state_dict, tokens, valid_lengths):
    """Right padding: every position HF defines matches.

    HF normalizes padded positions with the statistics of the valid ones, feeds them to CEMA
    and lets padded queries attend to the valid keys of their chunk, so padded positions are
    defined up to the first query with no valid key (a chunk that starts with padding). That
    row is undefined in HF (SDPA's all −inf row) and poisons the later padded positions; the
    oracle marks them NaN and they are skipped. Valid positions must always be defined, and
    they also match the newer HF revision (CEMA inputs masked, padded query outputs zeroed,
    mask-aware RoPE positions).
    """
    mask = _right_padding_mask(valid_lengths)
    config = _config()
    params = from_state_dict(state_dict, config, "hf")
    ours, _ = _logits(config, params, tokens, attention_mask=mask.astype(np.int32))
    expected = hf_reference.hf_forward(state_dict, SMALL, tokens, mask)
    defined = np.isfinite(expected).all(axis=-1)
    assert defined[mask].all()
    np.testing.assert_allclose(ours[defined], expected[defined], atol=ATOL, rtol=0)
    latest = hf_reference.hf_forward(state_dict, SMALL, tokens, mask, variant="latest")
    np.testing.assert_allclose(ours[mask], latest[mask], atol=ATOL, rtol=0)


def test_padded_batch_equals_shorter_sequence_in_oracle(state_dict, tokens):
    """Oracle self-check: right padding leaves the valid positions' logits unchanged."""
    short = SMALL["chunk_size"] + 5
    mask = _right_padding_mask([short, short])
    padded = hf_reference.hf_forward(state_dict, SMALL, tokens, mask)
    alone = hf_reference.hf_forward(state_dict, SMALL, tokens[:, :short])
    np.testing.assert_allclose(padded[:, :short], alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_streaming_split_matches_hf_one_shot(state_dict, tokens, oracle, scan_layers):
    """Our init_cache path with calls of 5, 1 and 13 tokens (crossing both chunk
    boundaries) reproduces HF's one-shot logits, also with scanned layers (stacked cache);
    HF's own chunk-local streaming cache (the oracle's cached path) equals its one-shot
    pass."""
    config = _config(scan_layers=scan_layers)
    params = from_state_dict(state_dict, config, "hf")
    cache = init_cache(config, BATCH)
    state = hf_reference.hf_init_state(state_dict, SMALL, BATCH)
    ours_parts, hf_parts, start = [], [], 0
    for size in (5, 1, 13):
        piece = tokens[:, start : start + size]
        logits, cache = _logits(config, params, piece, cache=cache)
        ours_parts.append(logits)
        logits, state = hf_reference.hf_forward_cached(state_dict, SMALL, piece, state)
        hf_parts.append(logits)
        start += size
    assert start == LENGTH
    np.testing.assert_allclose(np.concatenate(hf_parts, axis=1), oracle, atol=1e-10, rtol=0)
    np.testing.assert_allclose(np.concatenate(ours_parts, axis=1), oracle, atol=ATOL, rtol=0)
    assert int(cache.position) == state.position == LENGTH
    for ours_layer, hf_layer in zip(cache.layer_caches(), state.layers, strict=True):
        np.testing.assert_array_equal(np.asarray(ours_layer.norm.count), hf_layer.norm.count)
        np.testing.assert_allclose(np.asarray(ours_layer.norm.mean), hf_layer.norm.mean, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ours_layer.norm.var), hf_layer.norm.var, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ours_layer.cema), hf_layer.ema, atol=1e-5)


@pytest.mark.parametrize(
    "semantics",
    [
        pytest.param(dict(timestep_norm_variant="upstream"), id="upstream_timestep_norm"),
        pytest.param(None, id="all_upstream_defaults"),
    ],
)
def test_upstream_semantics_differ_from_hf(state_dict, tokens, oracle, semantics):
    """Negative control: the same HF weights under upstream TimestepNorm statistics give
    logits far outside the parity tolerance."""
    config = MegalodonConfig(**SMALL) if semantics is None else _config(**semantics)
    params = from_state_dict(state_dict, config, "hf")
    ours, _ = _logits(config, params, tokens)
    assert np.abs(ours - oracle).max() > 1000 * ATOL
