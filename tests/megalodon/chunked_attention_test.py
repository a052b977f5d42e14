"""Tests of chunked and streaming attention (spec §5, §10 items 18-20) and the KV ring.

Oracles (`tests/reference/attention.py`): a dense float64 softmax with the block-diagonal causal
mask, central differences of it for the gradients, and a loop that fills the KV ring slot by
slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.layers.attention import masked_attention
from megalodon_flax.megalodon.cache import AttentionCache
from megalodon_flax.megalodon.chunked_attention import (
    chunked_attention,
    ring_entries,
    ring_from_entries,
    streaming_attention,
)
from tests.reference import attention as reference

pytestmark = pytest.mark.usefixtures("highest_precision")

CHUNK = 8


def assert_ring(cache: AttentionCache, keys: np.ndarray, values: np.ndarray, position: int):
    batch = keys.shape[0]
    got_k, got_v = ring_entries(cache, batch)
    np.testing.assert_array_equal(np.asarray(got_k), reference.ring(keys, position, CHUNK))
    np.testing.assert_array_equal(np.asarray(got_v), reference.ring(values, position, CHUNK))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------------------- items 18-20
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
    expected = reference.dense_chunked_attention(q, k, v, CHUNK)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6, rtol=0)
    # The oracle's mask matters: full causal attention differs as soon as L > C.
    if length > CHUNK:
        causal = reference.dense_chunked_attention(q, k, v, chunk=10**6)
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
    expected = reference.dense_chunked_attention(q, k, v, CHUNK, key_valid)
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
        out, reference.dense_chunked_attention(q, k, v, CHUNK, key_valid), atol=1e-6, rtol=0
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
        return float(np.sum(reference.dense_chunked_attention(*a, CHUNK, key_valid) * weights))

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
        jnp.asarray(reference.ring(keys, position, CHUNK)),
        jnp.asarray(reference.ring(values, position, CHUNK)),
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
    expected = reference.dense_chunked_attention(q, k, v, CHUNK)[:, position:]
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
        reference.dense_chunked_attention(q, k, v, CHUNK),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("length", [1, 4])
def test_streaming_ignores_stale_ring_entries(length: int) -> None:
    """Garbage in ring slots outside the current chunk is never attended, on the one-token
    path and the multi-token path."""
    position = 11  # current chunk started at 8: slots 0-2 hold times 8-10
    q, k, v = _qkv(22, position + length)
    keys = reference.ring(k, position, CHUNK)
    values = reference.ring(v, position, CHUNK)
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
    expected = reference.dense_chunked_attention(q, k, v, CHUNK)[:, position:]
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize(
    ("dh", "dv", "valid"),
    [(8, 6, None), (4, 10, None), (8, 6, (2 * CHUNK + 3, CHUNK + 2)), (6, 6, (5, 0))],
)
def test_dot_product_kernel_matches_dense_oracle_and_xla(dh, dv, valid) -> None:
    """`jax.nn.dot_product_attention` with chunks folded into the batch == the float64 dense
    oracle and the xla kernel (values and gradients, 1e-5), for Q/K narrower or wider than
    V and right padding that leaves a chunk with no valid key (zeros, as xla)."""
    length = 2 * CHUNK + 3
    rng = np.random.default_rng(dh * 100 + dv)
    q, k = (jnp.asarray(_normal(rng, (2, length, 2, dh), 0.6)) for _ in range(2))
    v = jnp.asarray(_normal(rng, (2, length, 2, dv)))
    key_valid = None if valid is None else np.arange(length)[None] < np.asarray(valid)[:, None]

    def run(impl):
        def f(q, k, v):
            return chunked_attention(q, k, v, CHUNK, key_valid, impl=impl)

        weights = jnp.asarray(_normal(np.random.default_rng(5), (2, length, 2, dv)))
        out = jax.jit(f)(q, k, v)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(q, k, v)
        return out, grads

    out, grads = run("dot_product")
    out_xla, grads_xla = run("xla")
    expected = reference.dense_chunked_attention(
        np.asarray(q), np.asarray(k), np.asarray(v), CHUNK, key_valid
    )
    rows = np.ones((2, length), bool) if key_valid is None else None
    if rows is None:  # the oracle leaves rows with no valid key undefined; both kernels give 0
        chunk_start = (np.arange(length) // CHUNK) * CHUNK
        rows = chunk_start[None] < np.asarray(valid)[:, None]
        np.testing.assert_array_equal(np.asarray(out)[~rows], 0.0)
    np.testing.assert_allclose(np.asarray(out)[rows], expected[rows], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_xla), atol=1e-5, rtol=0)
    for got, want in zip(grads, grads_xla, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    assert any(float(jnp.max(jnp.abs(g))) > 0.1 for g in grads)


def test_auto_kernel_is_xla_and_unknown_names_fail() -> None:
    from megalodon_flax.megalodon.chunked_attention import resolve_attention_impl

    assert resolve_attention_impl("auto") == "xla"
    assert resolve_attention_impl("dot_product") == "dot_product"
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_attention_impl("flash")


def test_dot_product_kernel_asks_for_cudnn_only_on_gpu_in_bfloat16(monkeypatch) -> None:
    """JAX's own default (None) is its unfused XLA attention even on a GPU, so cuDNN must be
    named; it supports neither float32 nor a CPU."""
    from megalodon_flax.megalodon import chunked_attention

    assert chunked_attention.fused_attention_implementation(jnp.bfloat16) is None  # CPU
    monkeypatch.setattr(chunked_attention.jax, "default_backend", lambda: "gpu")
    assert chunked_attention.fused_attention_implementation(jnp.bfloat16) == "cudnn"
    assert chunked_attention.fused_attention_implementation(jnp.float32) is None
