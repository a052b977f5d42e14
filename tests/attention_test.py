"""Tests of RoPE, normalized Q/K, chunked and streaming attention (spec §2.5, §5, §10 items 15-20).

Oracles: float64 NumPy complex multiplication for RoPE, a dense float64 softmax with the
block-diagonal causal mask for attention, and a loop that fills the KV ring slot by slot.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.layers.attention import masked_attention
from megalodon_flax.layers.norms import rms_normalize
from megalodon_flax.layers.rotary import apply_rope, rope_frequencies
from megalodon_flax.megalodon import mega as attention_module
from megalodon_flax.megalodon.cache import AttentionCache
from megalodon_flax.megalodon.chunked_attention import (
    chunked_attention,
    ring_entries,
    ring_from_entries,
    streaming_attention,
)
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.mega import MovingAverageGatedAttention

jax.config.update("jax_default_matmul_precision", "highest")

F32_EPS = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- oracles
def rope_oracle(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, layout: str) -> np.ndarray:
    """Rotation as complex multiplication in float64.

    The angle is the float32 product pos·ω (the spec computes RoPE angles in float32);
    everything after that is exact up to float64 rounding.
    """
    x = np.asarray(x, np.float64)
    angles = (positions.astype(np.float32)[..., None] * freqs.astype(np.float32)).astype(np.float64)
    if angles.ndim == 2:
        angles = angles[None]
    rot = np.exp(1j * angles)[:, :, None, :]  # (B|1, L, 1, Dh/2)
    half = x.shape[-1] // 2
    if layout == "adjacent":
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    z = (x[..., :half] + 1j * x[..., half:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def dense_attention_oracle(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    chunk: int,
    key_valid: np.ndarray | None = None,
) -> np.ndarray:
    """Float64 softmax attention with mask s ≤ t ∧ floor(s/C) = floor(t/C) ∧ valid(s).

    q, k: (B, L, H, Dh); v: (B, L, H, Dv); times start at 0. Rows with no visible key are 0.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, length = q.shape[:2]
    t = np.arange(length)
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] // chunk == t[:, None] // chunk)
    allowed = np.broadcast_to(allowed, (batch, length, length))
    if key_valid is not None:
        allowed = allowed & np.asarray(key_valid, bool)[:, None, :]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k)
    mask = allowed[:, None]
    scores = np.where(mask, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(mask, np.exp(scores - row_max), 0.0)
    denom = np.sum(weights, axis=-1, keepdims=True)
    probs = np.where(denom > 0, weights / np.where(denom > 0, denom, 1.0), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def ring_oracle(entries: np.ndarray, position: int, chunk: int) -> np.ndarray:
    """Ring by slot after `position` tokens, (B, C, H, ·): slot j holds the latest entry t < T
    with t ≡ j (mod C), zeros where no token has reached the slot."""
    ring = np.zeros((entries.shape[0], chunk, *entries.shape[2:]), entries.dtype)
    for t in range(position):
        ring[:, t % chunk] = entries[:, t]
    return ring


def assert_ring(cache: AttentionCache, keys: np.ndarray, values: np.ndarray, position: int):
    batch = keys.shape[0]
    got_k, got_v = ring_entries(cache, batch)
    np.testing.assert_array_equal(np.asarray(got_k), ring_oracle(keys, position, CHUNK))
    np.testing.assert_array_equal(np.asarray(got_v), ring_oracle(values, position, CHUNK))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------------------- item 15: RoPE
@pytest.mark.parametrize("head_dim", [2, 8, 16, 64, 128, 256])
@pytest.mark.parametrize("base", [10000.0, 100000.0, 500.0])
def test_rope_frequencies_are_fp32_powers(head_dim: int, base: float) -> None:
    """ω_j equals base^(−2j/Dh) rounded once to float32 (exact exponents for these Dh)."""
    freqs = np.asarray(rope_frequencies(head_dim, base))
    assert freqs.dtype == np.float32
    assert freqs.shape == (head_dim // 2,)
    expected = np.array(
        [base ** (-2.0 * j / head_dim) for j in range(head_dim // 2)], np.float64
    ).astype(np.float32)
    np.testing.assert_array_equal(freqs, expected)


@pytest.mark.parametrize("head_dim", [6, 10, 12, 24])
def test_rope_frequencies_non_power_of_two_heads(head_dim: int) -> None:
    """For head widths whose exponent 2j/Dh is not a float32 number, ω stays within 1e-6."""
    freqs = np.asarray(rope_frequencies(head_dim, 10000.0), np.float64)
    expected = 10000.0 ** (-2.0 * np.arange(head_dim // 2) / head_dim)
    np.testing.assert_allclose(freqs, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["adjacent", "half_split"])
@pytest.mark.parametrize("max_position", [8, 256, 10000])
def test_rope_matches_complex_oracle(layout: str, max_position: int) -> None:
    """apply_rope == complex multiplication of the layout's pairs by exp(i·pos·ω) (1e-6)."""
    rng = np.random.default_rng(max_position)
    x = _normal(rng, (2, 24, 3, 16))
    positions = rng.integers(0, max_position, size=(2, 24))
    freqs = np.asarray(rope_frequencies(16, 10000.0))
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions, jnp.int32), jnp.asarray(freqs), layout)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), rope_oracle(x, positions, freqs, layout), atol=1e-6, rtol=0
    )
    # A shared (L,) position vector broadcasts over the batch.
    shared = positions[0]
    out_shared = apply_rope(
        jnp.asarray(x), jnp.asarray(shared, jnp.int32), jnp.asarray(freqs), layout
    )
    np.testing.assert_allclose(
        np.asarray(out_shared), rope_oracle(x, shared, freqs, layout), atol=1e-6, rtol=0
    )


def test_rope_layouts_differ_and_preserve_norm() -> None:
    """The two layouts rotate different pairs; both are rotations (norms preserved)."""
    rng = np.random.default_rng(1)
    x = _normal(rng, (1, 10, 2, 8))
    positions = jnp.arange(1, 11, dtype=jnp.int32)
    freqs = rope_frequencies(8, 10000.0)
    adjacent = np.asarray(apply_rope(jnp.asarray(x), positions, freqs, "adjacent"))
    half = np.asarray(apply_rope(jnp.asarray(x), positions, freqs, "half_split"))
    assert np.max(np.abs(adjacent - half)) > 1e-2
    for out in (adjacent, half):
        np.testing.assert_allclose(
            np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6
        )
    # Position 0 is the identity.
    zero = apply_rope(jnp.asarray(x), jnp.zeros((10,), jnp.int32), freqs, "adjacent")
    np.testing.assert_array_equal(np.asarray(zero), x)


def _rotated_scores(q: np.ndarray, k: np.ndarray, positions: np.ndarray) -> np.ndarray:
    freqs = rope_frequencies(q.shape[-1], 10000.0)
    pos = jnp.asarray(positions, jnp.int32)
    qr = np.asarray(apply_rope(jnp.asarray(q), pos, freqs), np.float64)
    kr = np.asarray(apply_rope(jnp.asarray(k), pos, freqs), np.float64)
    return np.einsum("bqhd,bkhd->bhqk", qr, kr)


@pytest.mark.parametrize("offset", [1, 7, 64, 100, 255, 500, 1000, 4096, 9999])
def test_rope_scores_invariant_to_position_offset(offset: int) -> None:
    """q_t·k_s depends only on pos(t) − pos(s).

    Tolerance 1e-5 for offsets up to a chunk of 256; beyond that the float32 rounding of
    the angle pos·ω (≤ eps32·pos per angle, two angles per score, unit-norm q and k) bounds
    the change, which is what any float32 angle computation attains.
    """
    rng = np.random.default_rng(offset)
    q = _normal(rng, (1, 32, 2, 16))
    k = _normal(rng, (1, 32, 2, 16))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    base = np.arange(32)
    reference = _rotated_scores(q, k, base)
    shifted = _rotated_scores(q, k, base + offset)
    tol = 1e-5 if offset <= 256 else 1e-5 + 2 * F32_EPS * (offset + 32)
    np.testing.assert_allclose(shifted, reference, atol=tol, rtol=0)
    # Scores really depend on the relative position (not a trivially invariant rotation).
    moved = _rotated_scores(q, k, base * 2)
    assert np.max(np.abs(moved - reference)) > 1e-2


# ----------------------------------------------------------------------------- item 16: layout
def _hf_to_adjacent_permutation(z_dim: int, heads: int) -> np.ndarray:
    """perm[h·Dh + j] = h·Dh + π(j) with π(2i) = i, π(2i+1) = i + Dh/2 (spec §8.3)."""
    dh = z_dim // heads
    local = np.empty(dh, np.int64)
    local[0::2] = np.arange(dh // 2)
    local[1::2] = np.arange(dh // 2) + dh // 2
    return np.concatenate([h * dh + local for h in range(heads)])


def _qk_scores(
    mx: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    heads: int,
    positions: np.ndarray,
    layout: str,
    eps: float = 1e-5,
) -> np.ndarray:
    """Attention scores of spec A5-A7 + RoPE from PyTorch-layout wz (Z, D)."""
    z = jnp.asarray(mx) @ jnp.asarray(w).T + jnp.asarray(b)
    batch, length, z_dim = z.shape
    dh = z_dim // heads
    z_hat = rms_normalize(z.reshape(batch, length, heads, dh), eps)
    g = jnp.asarray(gamma).reshape(2, heads, dh)
    be = jnp.asarray(beta).reshape(2, heads, dh)
    q = z_hat * (1.0 + g[0]) / math.sqrt(dh) + be[0]
    k = z_hat * (1.0 + g[1]) / math.sqrt(dh) + be[1]
    freqs = rope_frequencies(dh, 10000.0)
    pos = jnp.asarray(positions, jnp.int32)
    q = np.asarray(apply_rope(q, pos, freqs, layout), np.float64)
    k = np.asarray(apply_rope(k, pos, freqs, layout), np.float64)
    return np.einsum("bqhd,bkhd->bhqk", q, k)


def test_half_split_with_hf_weights_equals_adjacent_with_permuted_weights() -> None:
    """HF half-split RoPE on HF weights == adjacent RoPE on §8.3-permuted weights (1e-6)."""
    rng = np.random.default_rng(16)
    dim, z_dim, heads, length = 24, 32, 4, 12
    mx = _normal(rng, (2, length, dim))
    w_hf = _normal(rng, (z_dim, dim), 1.0 / math.sqrt(3 * dim))
    b_hf = _normal(rng, (z_dim,), 0.1)
    gamma_hf = _normal(rng, (2, z_dim), 0.2)
    beta_hf = _normal(rng, (2, z_dim), 0.05)
    positions = np.arange(length) % 8
    perm = _hf_to_adjacent_permutation(z_dim, heads)
    # Spec §8.3 with explicit loops: new[h·Dh + j] = hf[h·Dh + π(j)].
    dh = z_dim // heads
    w_new = np.empty_like(w_hf)
    b_new = np.empty_like(b_hf)
    gamma_new = np.empty_like(gamma_hf)
    beta_new = np.empty_like(beta_hf)
    for h in range(heads):
        for j in range(dh):
            src = h * dh + (j // 2 if j % 2 == 0 else j // 2 + dh // 2)
            assert perm[h * dh + j] == src
            w_new[h * dh + j] = w_hf[src]
            b_new[h * dh + j] = b_hf[src]
            gamma_new[:, h * dh + j] = gamma_hf[:, src]
            beta_new[:, h * dh + j] = beta_hf[:, src]
    hf_scores = _qk_scores(mx, w_hf, b_hf, gamma_hf, beta_hf, heads, positions, "half_split")
    new_scores = _qk_scores(mx, w_new, b_new, gamma_new, beta_new, heads, positions, "adjacent")
    np.testing.assert_allclose(new_scores, hf_scores, atol=1e-6, rtol=0)
    # Without the permutation the adjacent layout computes different scores.
    unpermuted = _qk_scores(mx, w_hf, b_hf, gamma_hf, beta_hf, heads, positions, "adjacent")
    assert np.max(np.abs(unpermuted - hf_scores)) > 1e-3


# ----------------------------------------------------------------------------- item 17: Q/K norm
ATTN_CONFIG = MegalodonConfig(
    vocab_size=16,
    model_dim=32,
    num_layers=1,
    num_heads=2,
    z_dim=16,
    value_dim=32,
    ffn_hidden_dim=32,
    cema_ndim=2,
    chunk_size=8,
    norm_num_groups=4,
)


@functools.cache
def _attention_params() -> dict:
    module = MovingAverageGatedAttention(ATTN_CONFIG)
    x = jnp.zeros((2, 12, ATTN_CONFIG.model_dim), jnp.float32)
    return jax.jit(lambda key: nn.unbox(module.init(key, x)))(jax.random.PRNGKey(17))


@pytest.mark.parametrize("wz_scale", [1.0, 1e-3])
def test_normalized_qk_norms(monkeypatch: pytest.MonkeyPatch, wz_scale: float) -> None:
    """With γ_qk = β_qk = 0, ‖q‖ = ‖k‖ = sqrt(m/(m+eps)), m = mean(z²) per head.

    q and k are captured where the module hands them to the attention kernel, z where the
    wz projection returns it. A tiny wz makes m comparable to eps so eps is visible.
    """
    variables = jax.tree.map(lambda a: a, _attention_params())
    params = variables["params"]
    assert not np.any(np.asarray(params["gamma"])) and not np.any(np.asarray(params["beta"]))
    params["wz"]["kernel"] = params["wz"]["kernel"] * wz_scale
    params["wz"]["bias"] = jnp.zeros_like(params["wz"]["bias"])
    captured: dict[str, jax.Array] = {}

    def capture(q, k, v, *args, **kwargs):
        captured["q"], captured["k"] = q, k
        return chunked_attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module, "chunked_attention", capture)

    @jax.jit
    def run(variables: dict, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        _, state = MovingAverageGatedAttention(ATTN_CONFIG).apply(
            variables, x, capture_intermediates=True, mutable=["intermediates"]
        )
        # The captured arrays belong to this trace, so they can be returned from it.
        return state["intermediates"]["wz"]["__call__"][0], captured["q"], captured["k"]

    rng = np.random.default_rng(3)
    x = jnp.asarray(_normal(rng, (2, 12, ATTN_CONFIG.model_dim)))
    z, q, k = (np.asarray(a, np.float64) for a in run(variables, x))
    heads, dh = ATTN_CONFIG.num_heads, ATTN_CONFIG.head_dim
    m = np.mean(z.reshape(2, 12, heads, dh) ** 2, axis=-1)
    expected = np.sqrt(m / (m + ATTN_CONFIG.norm_eps))
    if wz_scale < 1.0:
        assert np.max(expected) < 0.99  # eps matters in this regime
    else:
        assert np.min(expected) > 1 - 1e-4
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), expected, rtol=2e-6, atol=0)
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), expected, rtol=2e-6, atol=0)
    # q and k coincide when γ = β = 0: the score of a token with itself is m/(m+eps), no
    # extra 1/sqrt(Dh) or temperature.
    self_scores = np.sum(q * k, axis=-1)
    np.testing.assert_allclose(self_scores, expected**2, rtol=4e-6, atol=0)


# ----------------------------------------------------------------------------- items 18-20
CHUNK = 8


def _qkv(seed: int, length: int, batch: int = 2, heads: int = 2) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q = _normal(rng, (batch, length, heads, 8), 0.6)
    k = _normal(rng, (batch, length, heads, 8), 0.6)
    v = _normal(rng, (batch, length, heads, 6))
    return q, k, v


_chunked = jax.jit(chunked_attention, static_argnames=("chunk_size",))


@pytest.mark.parametrize("length", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 3])
def test_chunked_attention_matches_dense_oracle(length: int) -> None:
    """Chunked attention == dense float64 softmax with the block-diagonal causal mask."""
    q, k, v = _qkv(length, length)
    out = _chunked(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk_size=CHUNK)
    assert out.shape == v.shape and out.dtype == jnp.float32
    expected = dense_attention_oracle(q, k, v, CHUNK)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6, rtol=0)
    # The oracle's mask matters: full causal attention differs as soon as L > C.
    if length > CHUNK:
        causal = dense_attention_oracle(q, k, v, chunk=10**6)
        assert np.max(np.abs(causal - expected)) > 1e-3


def test_chunked_attention_with_key_mask_matches_oracle() -> None:
    """Invalid keys are never attended (random key mask, every query keeps ≥ 1 key)."""
    length = 2 * CHUNK + 3
    q, k, v = _qkv(7, length)
    rng = np.random.default_rng(70)
    key_valid = rng.random((2, length)) > 0.3
    key_valid[:, ::CHUNK] = True
    out = _chunked(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk_size=CHUNK, key_valid=key_valid
    )
    expected = dense_attention_oracle(q, k, v, CHUNK, key_valid)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tensor", ["v", "k"])
@pytest.mark.parametrize("chunk_index", [0, 1, 3])
def test_perturbation_stays_in_its_chunk(tensor: str, chunk_index: int) -> None:
    """Perturbing v or k at time s of chunk c changes outputs only at t ≥ s in chunk c;
    every other output is bit-identical."""
    length = 3 * CHUNK + 2  # chunk 3 is partial
    q, k, v = _qkv(18, length)
    s = chunk_index * CHUNK + 1
    perturbed = {"q": q, "k": k.copy(), "v": v.copy()}
    perturbed[tensor][:, s] += 0.5
    base = np.asarray(_chunked(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk_size=CHUNK))
    out = np.asarray(
        _chunked(
            jnp.asarray(q),
            jnp.asarray(perturbed["k"]),
            jnp.asarray(perturbed["v"]),
            chunk_size=CHUNK,
        )
    )
    end = min((chunk_index + 1) * CHUNK, length)
    affected = np.zeros(length, bool)
    affected[s:end] = True
    np.testing.assert_array_equal(out[:, ~affected], base[:, ~affected])
    changed = np.max(np.abs(out - base), axis=(0, 2, 3))
    assert np.all(changed[affected] > 0)


def test_fully_masked_query_rows_return_zeros() -> None:
    """A query with no visible key outputs exact zeros, never NaN; other rows match the oracle."""
    length = 2 * CHUNK + 3
    q, k, v = _qkv(20, length)
    key_valid = np.ones((2, length), bool)
    key_valid[0, :3] = False  # left padding: queries 0-2 of row 0 see nothing
    key_valid[1, CHUNK : 2 * CHUNK] = False  # a whole chunk of row 1
    out = np.asarray(
        _chunked(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk_size=CHUNK, key_valid=key_valid
        )
    )
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, :3], 0.0)
    np.testing.assert_array_equal(out[1, CHUNK : 2 * CHUNK], 0.0)
    np.testing.assert_allclose(
        out, dense_attention_oracle(q, k, v, CHUNK, key_valid), atol=1e-6, rtol=0
    )
    # The generic kernel with an all-False mask behaves the same.
    allowed = np.zeros((length, length), bool)
    empty = masked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), allowed)
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


def _attention_loss_grads(weights: np.ndarray, key_valid: np.ndarray, **kwargs):
    """d Σ(out · weights) / d(q, k, v) of `chunked_attention`."""

    def loss(q, k, v):
        out = chunked_attention(q, k, v, CHUNK, jnp.asarray(key_valid), **kwargs)
        return jnp.sum(out.astype(jnp.float32) * weights)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _finite_difference_grads(q, k, v, weights, key_valid, eps: float = 1e-6):
    """Central differences of the float64 dense oracle, one coordinate at a time."""
    args = [a.astype(np.float64) for a in (q, k, v)]

    def loss(a):
        return float(np.sum(dense_attention_oracle(*a, CHUNK, key_valid) * weights))

    grads = []
    for i, a in enumerate(args):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            hi = [x.copy() for x in args]
            lo = [x.copy() for x in args]
            hi[i][idx] += eps
            lo[i][idx] -= eps
            g[idx] = (loss(hi) - loss(lo)) / (2 * eps)
        grads.append(g)
    return grads


def test_attention_gradients_match_finite_differences() -> None:
    """The hand-written backward pass (probabilities as the only saved activation) against
    float64 central differences, with padded keys and fully masked query rows."""
    length = CHUNK + 3
    q, k, v = _qkv(30, length, batch=1)
    key_valid = np.ones((1, length), bool)
    key_valid[0, :2] = False  # queries 0-1 see nothing
    key_valid[0, CHUNK + 1] = False
    weights = np.random.default_rng(31).standard_normal((1, length, 2, 6))
    grads = _attention_loss_grads(weights.astype(np.float32), key_valid)(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    )
    expected = _finite_difference_grads(q, k, v, weights, key_valid)
    for got, want in zip(grads, expected, strict=True):
        assert np.all(np.isfinite(np.asarray(got)))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_attention_gradients_match_autodiff(compute_dtype) -> None:
    """The custom backward pass equals differentiation of the same forward (the path taken
    with dropout on the probabilities; an identity 'dropout' selects it)."""
    length = 2 * CHUNK + 3
    q, k, v = _qkv(32, length)
    key_valid = np.ones((2, length), bool)
    key_valid[1, CHUNK : 2 * CHUNK] = False
    weights = np.random.default_rng(33).standard_normal((2, length, 2, 6)).astype(np.float32)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    custom = _attention_loss_grads(weights, key_valid, compute_dtype=compute_dtype)(*args)
    autodiff = _attention_loss_grads(
        weights, key_valid, compute_dtype=compute_dtype, prob_dropout=lambda p: p
    )(*args)
    tol = 1e-6 if compute_dtype == jnp.float32 else 2e-2
    for got, want in zip(custom, autodiff, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- streaming
_streaming = jax.jit(streaming_attention, static_argnames=("chunk_size",))


def _ring_cache(keys: np.ndarray, values: np.ndarray, position: int) -> AttentionCache:
    return ring_from_entries(
        jnp.asarray(ring_oracle(keys, position, CHUNK)),
        jnp.asarray(ring_oracle(values, position, CHUNK)),
    )


def test_ring_storage_layout() -> None:
    """Keys are stored (B·H, Dh, C) and values (B·H, C, Dv), row b·H + h; `ring_entries`
    and `ring_from_entries` convert to and from the token-major (B, C, H, ·) layout."""
    rng = np.random.default_rng(3)
    keys, values = _normal(rng, (2, CHUNK, 3, 4)), _normal(rng, (2, CHUNK, 3, 5))
    cache = ring_from_entries(jnp.asarray(keys), jnp.asarray(values))
    assert cache.keys.shape == (6, 4, CHUNK) and cache.values.shape == (6, CHUNK, 5)
    for b, h, j in [(0, 0, 0), (1, 2, 7), (1, 0, 3), (0, 1, 5)]:
        np.testing.assert_array_equal(np.asarray(cache.keys)[b * 3 + h, :, j], keys[b, j, h])
        np.testing.assert_array_equal(np.asarray(cache.values)[b * 3 + h, j], values[b, j, h])
    back_k, back_v = ring_entries(cache, 2)
    np.testing.assert_array_equal(np.asarray(back_k), keys)
    np.testing.assert_array_equal(np.asarray(back_v), values)


@pytest.mark.parametrize(
    ("position", "length"),
    [(0, 5), (3, 4), (5, 3), (6, 5), (8, 8), (15, 1), (2, 9), (13, 20), (7, 17), (16, 24)],
)
def test_streaming_attention_matches_dense_oracle(position: int, length: int) -> None:
    """L new tokens after T cached ones == rows T…T+L−1 of the dense oracle; the ring after
    the call holds exactly the current chunk's keys/values at slot t mod C, zeros elsewhere."""
    total = position + length
    q, k, v = _qkv(100 * position + length, total)
    cache = _ring_cache(k, v, position)
    out, new_cache = _streaming(
        jnp.asarray(q[:, position:]),
        jnp.asarray(k[:, position:]),
        jnp.asarray(v[:, position:]),
        cache,
        jnp.asarray(position, jnp.int32),
        chunk_size=CHUNK,
    )
    expected = dense_attention_oracle(q, k, v, CHUNK)[:, position:]
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6, rtol=0)
    assert_ring(new_cache, k, v, total)


def test_streaming_attention_partition_matches_dense_oracle() -> None:
    """A stream split into calls of sizes 3,5,8,1,7,16,2,3 (crossing chunk boundaries, one
    call longer than C) reproduces the dense oracle; the ring is right after every call."""
    sizes = [3, 5, 8, 1, 7, 16, 2, 3]
    total = sum(sizes)
    q, k, v = _qkv(21, total)
    cache = ring_from_entries(
        jnp.zeros((2, CHUNK, 2, 8), jnp.float32), jnp.zeros((2, CHUNK, 2, 6), jnp.float32)
    )
    outputs = []
    position = 0
    for size in sizes:
        sl = slice(position, position + size)
        out, cache = _streaming(
            jnp.asarray(q[:, sl]),
            jnp.asarray(k[:, sl]),
            jnp.asarray(v[:, sl]),
            cache,
            jnp.asarray(position, jnp.int32),
            chunk_size=CHUNK,
        )
        outputs.append(np.asarray(out))
        position += size
        assert_ring(cache, k, v, position)
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=1),
        dense_attention_oracle(q, k, v, CHUNK),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("length", [1, 4])
def test_streaming_ignores_stale_ring_entries(length: int) -> None:
    """Garbage in ring slots outside the current chunk is never attended, on the one-token
    path and the multi-token path."""
    position = 11  # current chunk started at 8: slots 0-2 hold times 8-10
    q, k, v = _qkv(22, position + length)
    keys = ring_oracle(k, position, CHUNK)
    values = ring_oracle(v, position, CHUNK)
    keys[:, 3:] = 50.0
    values[:, 3:] = -50.0
    out, _ = _streaming(
        jnp.asarray(q[:, position:]),
        jnp.asarray(k[:, position:]),
        jnp.asarray(v[:, position:]),
        ring_from_entries(jnp.asarray(keys), jnp.asarray(values)),
        jnp.asarray(position, jnp.int32),
        chunk_size=CHUNK,
    )
    expected = dense_attention_oracle(q, k, v, CHUNK)[:, position:]
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6, rtol=0)
