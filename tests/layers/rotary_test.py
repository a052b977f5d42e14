"""Tests of rotary embeddings (spec §2.5, §10 items 15-16): frequencies, both pair layouts,
relative-position invariance and the HF half-split layout against permuted weights.

Oracles: float64 NumPy complex multiplication for RoPE (`tests/reference/attention.py`), the
frequencies computed in float64 and rounded once, and explicit loops for the §8.3 permutation.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.layers.norms import rms_normalize
from megalodon_flax.layers.rotary import apply_rope, rope_frequencies
from tests.reference import attention as reference

pytestmark = pytest.mark.usefixtures("highest_precision")

F32_EPS = float(np.finfo(np.float32).eps)


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
        np.asarray(out), reference.rope(x, positions, freqs, layout), atol=1e-6, rtol=0
    )
    # A shared (L,) position vector broadcasts over the batch.
    shared = positions[0]
    out_shared = apply_rope(
        jnp.asarray(x), jnp.asarray(shared, jnp.int32), jnp.asarray(freqs), layout
    )
    np.testing.assert_allclose(
        np.asarray(out_shared), reference.rope(x, shared, freqs, layout), atol=1e-6, rtol=0
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
