"""Tests of TimestepNorm (spec §4) against float64 NumPy oracles: §10 items 9-14.

Oracles (`tests/reference/timestep_norm.py`): a brute force that collects every scalar of
S(b, g, t) (§4.1) and merges the incoming state's (count, mean, var) exactly in float64; a
sequential block-Welford loop (§4.3); a direct loop of megalodon-hf's formula (§4.6). Anchored
float64 prefix sums (here) for the long large-offset stream.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.megalodon.timestep_norm import (
    NormState,
    TimestepNorm,
    timestep_norm_statistics,
    timestep_norm_statistics_hf,
)
from tests.reference import timestep_norm as reference

pytestmark = pytest.mark.usefixtures("highest_precision")

B, L, D, G = 3, 50, 16, 4
GS = D // G
EPS = 1e-5
VARIANTS = ("upstream", "hf")


# --------------------------------------------------------------------------- helpers


def _inputs(seed: int, batch: int = B, length: int = L, dim: int = D) -> np.ndarray:
    """3·N(0, 1) + 1 in float32."""
    rng = np.random.default_rng(seed)
    return (3.0 * rng.normal(size=(batch, length, dim)) + 1.0).astype(np.float32)


def _affine(seed: int, dim: int = D) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "weight": (0.3 * rng.normal(size=dim)).astype(np.float32),
        "bias": rng.normal(size=dim).astype(np.float32),
    }


def _incoming_state(seed: int) -> NormState:
    """Row 0 fresh; rows 1, 2 carry statistics of earlier timesteps."""
    rng = np.random.default_rng(seed)
    mean = (2.0 * rng.normal(size=(B, G)) + 1.0).astype(np.float32)
    var = rng.uniform(0.5, 9.0, size=(B, G)).astype(np.float32)
    mean[0], var[0] = 0.0, 1.0
    count = np.array([0, 5, 17], np.int32)
    return NormState.uncompensated(jnp.asarray(count), jnp.asarray(mean), jnp.asarray(var))


def _random_mask(seed: int, batch: int = B, length: int = L) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.uniform(size=(batch, length)) < 0.7
    mask[0, :4] = False  # leading padding on the fresh row
    mask[-1, -6:] = False  # right padding
    return mask


def _np_state(state: NormState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.asarray(state.count), np.asarray(state.mean), np.asarray(state.var)


def _brute_force(
    x: np.ndarray, params: dict[str, np.ndarray], mask: np.ndarray | None, state: NormState
) -> tuple[np.ndarray, np.ndarray, np.ndarray, reference.State]:
    """The §4.1 brute force on this module's sizes: y, mean, var and the final state."""
    weight, bias = params["weight"], params["bias"]
    return reference.brute_force(x, weight, bias, G, EPS, mask, _np_state(state))


_statistics = jax.jit(timestep_norm_statistics, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("variant",))
def _apply(
    params: dict[str, jax.Array],
    x: jax.Array,
    state: NormState | None,
    mask: jax.Array | None,
    variant: str = "upstream",
) -> tuple[jax.Array, NormState]:
    module = TimestepNorm(num_groups=G, eps=EPS, variant=variant)
    return module.apply({"params": params}, x, state, mask)


def _assert_state(
    state: NormState, expected: tuple[np.ndarray, np.ndarray, np.ndarray], tol: float
) -> None:
    count, mean, var = _np_state(state)
    assert state.count.dtype == jnp.int32
    assert state.mean.dtype == jnp.float32 and state.var.dtype == jnp.float32
    np.testing.assert_array_equal(count, expected[0])
    np.testing.assert_allclose(mean, expected[1], atol=tol, rtol=tol, err_msg="state mean")
    np.testing.assert_allclose(var, expected[2], atol=tol, rtol=tol, err_msg="state var")


# --------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("case", ["fresh_unmasked", "incoming_state_masked"])
def test_matches_brute_force(case: str) -> None:
    x = _inputs(0)
    params = _affine(1)
    if case == "fresh_unmasked":
        state, mask = NormState.fresh(B, G), None
        y, new_state = _apply(params, x, None, None)
    else:
        state, mask = _incoming_state(2), _random_mask(3)
        y, new_state = _apply(params, x, state, mask)
    y_ref, mean_ref, var_ref, state_ref = _brute_force(x, params, mask, state)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5, rtol=1e-5)
    _assert_state(new_state, state_ref, 1e-5)
    mean, var, _ = _statistics(x, G, state, mask)
    valid = np.ones((B, L), bool) if mask is None else mask
    seen = (np.cumsum(valid, axis=1) + np.asarray(state.count)[:, None]) > 0
    np.testing.assert_allclose(np.asarray(mean)[seen], mean_ref[seen], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(var)[seen], var_ref[seen], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- item 10


def test_associative_merge_matches_sequential_welford() -> None:
    length = 200
    x = _inputs(4, length=length)
    mask = _random_mask(5, length=length)
    state = _incoming_state(6)
    mean, var, new_state = _statistics(x, G, state, mask)
    mean_ref, var_ref, seen = reference.block_welford(x, G, mask, _np_state(state))
    mean, var = np.asarray(mean), np.asarray(var)
    atol_mean = 1e-6 * float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    np.testing.assert_allclose(mean[seen], mean_ref[seen], atol=atol_mean, rtol=1e-6)
    np.testing.assert_allclose(var[seen], var_ref[seen], atol=0.0, rtol=1e-6)
    count_ref = np.asarray(state.count) + mask.sum(1)
    np.testing.assert_array_equal(np.asarray(new_state.count), count_ref)
    np.testing.assert_allclose(
        np.asarray(new_state.mean), mean_ref[:, -1], atol=atol_mean, rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(new_state.var), var_ref[:, -1], atol=0.0, rtol=1e-6)


@pytest.mark.parametrize("with_state", [False, True])
def test_hf_variant_matches_formula_loop(with_state: bool) -> None:
    length = 200
    x = _inputs(7, length=length)
    mask = _random_mask(8, length=length)
    state = _incoming_state(9) if with_state else NormState.fresh(B, G)
    stats = jax.jit(timestep_norm_statistics_hf, static_argnums=1)
    mean, var, new_state = stats(x, G, state, mask)
    mean_ref, var_ref, state_ref = reference.hf_statistics(x, G, mask, _np_state(state))
    atol_mean = 1e-6 * float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    np.testing.assert_allclose(np.asarray(mean), mean_ref, atol=atol_mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(var), var_ref, atol=0.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_state.count), state_ref[0])
    np.testing.assert_allclose(np.asarray(new_state.mean), state_ref[1], atol=atol_mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_state.var), state_ref[2], atol=0.0, rtol=1e-6)
    # The module normalizes with these statistics and does not zero padded positions.
    params = _affine(10)
    y, _ = _apply(params, x[:, :L], state, mask[:, :L], variant="hf")
    mean_ref, var_ref = mean_ref[:, :L], var_ref[:, :L]
    xg = x[:, :L].astype(np.float64).reshape(B, L, G, GS)
    normed = ((xg - mean_ref[..., None]) / np.sqrt(var_ref[..., None] + EPS)).reshape(B, L, D)
    y_ref = normed * (1.0 + params["weight"]) + params["bias"]
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- item 11


@pytest.mark.parametrize("variant", VARIANTS)
def test_streaming_equals_one_shot(variant: str) -> None:
    length = 64
    x = _inputs(11, length=length)
    mask = _random_mask(12, length=length)
    state0 = _incoming_state(13)
    params = _affine(14)
    y_full, state_full = _apply(params, x, state0, mask, variant=variant)
    for cuts in [(1,), (63,), (16, 32, 48)]:
        bounds = (0, *cuts, length)
        state, pieces = state0, []
        for lo, hi in itertools.pairwise(bounds):
            y_part, state = _apply(params, x[:, lo:hi], state, mask[:, lo:hi], variant=variant)
            pieces.append(np.asarray(y_part))
        y_stream = np.concatenate(pieces, axis=1)
        np.testing.assert_allclose(
            y_stream, np.asarray(y_full), atol=1e-5, rtol=1e-4, err_msg=f"cuts {cuts}"
        )
        np.testing.assert_array_equal(np.asarray(state.count), np.asarray(state_full.count))
        for field in ("mean", "var"):
            np.testing.assert_allclose(
                np.asarray(getattr(state, field)),
                np.asarray(getattr(state_full, field)),
                atol=2e-5,
                rtol=2e-5,
                err_msg=f"{field}, cuts {cuts}",
            )


# --------------------------------------------------------------------------- item 12


def test_masked_outputs_are_zero() -> None:
    x = _inputs(15)
    mask = _random_mask(16)
    y, _ = _apply(_affine(17), x, _incoming_state(18), mask)
    y = np.asarray(y)
    assert np.all(y[~mask] == 0.0)
    assert np.all(y[mask] != 0.0)


def _busy_state(seed: int) -> NormState:
    """Non-trivial incoming statistics on every row (counts 1..1000, arbitrary variances)."""
    rng = np.random.default_rng(seed)
    return NormState.uncompensated(
        jnp.asarray(rng.integers(1, 1000, size=B), jnp.int32),
        jnp.asarray(3.0 * rng.normal(size=(B, G)), jnp.float32),
        jnp.asarray(rng.uniform(0.1, 9.0, size=(B, G)), jnp.float32),
    )


@pytest.mark.parametrize("seed", [19, 20, 21])
def test_fully_masked_call_leaves_state_bit_exact(seed: int) -> None:
    state = _busy_state(seed)
    y, new_state = _apply(_affine(seed), _inputs(seed), state, np.zeros((B, L), bool))
    assert np.all(np.asarray(y) == 0.0)
    for got, want in zip(_np_state(new_state), _np_state(state), strict=True):
        np.testing.assert_array_equal(got, want)


def test_fully_masked_call_keeps_hf_state() -> None:
    state = _busy_state(22)
    mask = np.zeros((B, L), bool)
    _, new_state = _apply(_affine(22), _inputs(22), state, mask, variant="hf")
    count, mean, var = _np_state(new_state)
    np.testing.assert_array_equal(count, np.asarray(state.count))
    np.testing.assert_allclose(mean, np.asarray(state.mean), atol=1e-7, rtol=1e-6)
    np.testing.assert_allclose(var, np.asarray(state.var), atol=0.0, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_values_at_masked_positions_do_not_leak(variant: str) -> None:
    x = _inputs(22)
    mask = _random_mask(23)
    state = _incoming_state(24)
    params = _affine(25)
    rng = np.random.default_rng(26)
    poison = np.array([np.nan, np.inf, -np.inf, 3e38], np.float32)
    x_bad = np.where(mask[..., None], x, poison[rng.integers(0, 4, x.shape)]).astype(np.float32)
    x_zero = np.where(mask[..., None], x, 0.0).astype(np.float32)
    y_bad, state_bad = _apply(params, x_bad, state, mask, variant=variant)
    y_zero, state_zero = _apply(params, x_zero, state, mask, variant=variant)
    valid = np.broadcast_to(mask[..., None], x.shape)
    np.testing.assert_array_equal(np.asarray(y_bad)[valid], np.asarray(y_zero)[valid])
    for got, want in zip(_np_state(state_bad), _np_state(state_zero), strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.all(np.isfinite(np.asarray(y_bad)[valid]))


# --------------------------------------------------------------------------- item 13


def test_fresh_state_first_step_uses_block_moments() -> None:
    rng = np.random.default_rng(27)
    # Within-block variance ≈ 0.01, far from the fresh state's var = 1.
    x = (5.0 + 0.1 * rng.normal(size=(B, L, D))).astype(np.float32)
    first = np.array([0, 3, 7])
    mask = np.arange(L)[None, :] >= first[:, None]
    params = _affine(28)
    y, _ = _apply(params, x, NormState.fresh(B, G), mask)
    for b, t in enumerate(first):
        xg = x[b, t].astype(np.float64).reshape(G, GS)
        mu = xg.mean(-1, keepdims=True)
        v = np.mean((xg - mu) ** 2, axis=-1, keepdims=True)
        expected = ((xg - mu) / np.sqrt(v + EPS)).reshape(D) * (1.0 + params["weight"])
        expected = expected + params["bias"]
        np.testing.assert_allclose(np.asarray(y)[b, t], expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- item 14


def test_large_offset_long_stream() -> None:
    batch, length = 2, 4096
    rng = np.random.default_rng(29)
    x = (1e4 + rng.normal(size=(batch, length, D))).astype(np.float32)
    params = _affine(30)
    y, state = _apply(params, x, None, None)
    y = np.asarray(y)
    assert np.all(np.isfinite(y))
    # Float64 prefix sums around the exact anchor 1e4 (no cancellation at this scale).
    xc = x.astype(np.float64).reshape(batch, length, G, GS) - 1e4
    n = GS * np.arange(1, length + 1)[None, :, None]
    mean_c = np.cumsum(xc.sum(-1), axis=1) / n
    var = np.cumsum((xc**2).sum(-1), axis=1) / n - mean_c**2
    normed = (xc - mean_c[..., None]) / np.sqrt(var[..., None] + EPS)
    y_ref = normed.reshape(batch, length, D) * (1.0 + params["weight"]) + params["bias"]
    np.testing.assert_allclose(y, y_ref, atol=1e-3, rtol=0.0)
    np.testing.assert_allclose(np.asarray(state.mean) - 1e4, mean_c[:, -1], atol=1e-3, rtol=0.0)
    np.testing.assert_allclose(np.asarray(state.var), var[:, -1], atol=1e-3, rtol=0.0)


def test_constant_input_zero_variance_outputs_bias() -> None:
    rng = np.random.default_rng(31)
    constants = np.concatenate(
        [3.0 * rng.normal(size=(B - 1, 1, G, 1)) + 1.0, np.full((1, 1, G, 1), 1e4 + 0.37)]
    )
    x = np.broadcast_to(constants, (B, L, G, GS)).reshape(B, L, D).astype(np.float32)
    params = _affine(32)
    _, var, _ = _statistics(x, G, NormState.fresh(B, G), None)
    assert np.all(np.asarray(var) >= 0.0)
    bias = np.broadcast_to(params["bias"], (B, L, D))
    # One call from a fresh state, then a continuation of the same constant stream.
    y1, state = _apply(params, x, None, None)
    y2, state = _apply(params, x, state, np.ones((B, L), bool))
    assert np.all(np.asarray(state.var) >= 0.0)
    np.testing.assert_allclose(np.asarray(y1), bias, atol=1e-5, rtol=0.0)
    np.testing.assert_allclose(np.asarray(y2), bias, atol=1e-5, rtol=0.0)


# --------------------------------------------------------------------------- dtypes


def test_bf16_input_keeps_float32_state() -> None:
    x = _inputs(33)
    params = _affine(34)
    y_bf16, state_bf16 = _apply(params, jnp.asarray(x, jnp.bfloat16), None, None)
    assert y_bf16.dtype == jnp.bfloat16
    assert state_bf16.mean.dtype == jnp.float32 and state_bf16.var.dtype == jnp.float32
    x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    y_ref, _, _, state_ref = _brute_force(x_rounded, params, None, NormState.fresh(B, G))
    np.testing.assert_allclose(np.asarray(y_bf16, np.float32), y_ref, atol=1e-2, rtol=2.0**-7)
    _assert_state(state_bf16, state_ref, 1e-5)


def test_long_unmasked_call_equals_the_all_valid_mask() -> None:
    """From `OPAQUE_MASK_FROM` timesteps an unmasked call hides its all-valid mask from XLA's
    constant folding: the outputs, state and gradient equal those of an explicit all-true
    mask, which never took that branch, and the brute-force statistics at the end."""
    from megalodon_flax.megalodon.timestep_norm import OPAQUE_MASK_FROM

    length = OPAQUE_MASK_FROM + 5
    x = jnp.asarray(_inputs(40, batch=1, length=length))
    params = _affine(41)
    ones = jnp.ones((1, length), bool)
    y, state = _apply(params, x, None, None)
    y_mask, state_mask = _apply(params, x, None, ones)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_mask), rtol=1e-6, atol=1e-6)
    for a, b in zip(_np_state(state), _np_state(state_mask), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    xg = np.asarray(x, np.float64).reshape(1, length, G, GS)
    np.testing.assert_allclose(np.asarray(state.mean)[0], xg.mean(axis=(1, 3))[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.var)[0], xg.var(axis=(1, 3))[0], rtol=1e-5)

    def loss(x, mask):
        return jnp.sum(jnp.sin(_apply(params, x, None, mask)[0]))

    g = jax.jit(jax.grad(loss), static_argnums=1)(x, None)
    g_mask = jax.jit(jax.grad(loss))(x, ones)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("length", "masked", "offset", "dtype"),
    [
        (L, False, 0.0, jnp.float32),
        (L, True, 0.0, jnp.float32),
        (300, True, 1e3, jnp.float32),  # several summary blocks, a large common offset
        (1, False, 0.0, jnp.float32),
        (L, True, 0.0, jnp.bfloat16),
    ],
)
def test_fresh_call_gradient_equals_the_differentiated_merges(length, masked, offset, dtype):
    """A call from no state differentiates through `fresh_normalized`'s closed-form VJP;
    passing the same fresh state explicitly differentiates the blocked merges themselves.
    Both give the same forward values and the same input gradient."""
    x = jnp.asarray(_inputs(50, length=length) + offset).astype(dtype)
    mask = jnp.asarray(_random_mask(51, length=length)) if masked else None
    params = _affine(52)
    w = jnp.asarray(np.random.default_rng(53).normal(size=x.shape), jnp.float32)

    def loss(x, state):
        y, _ = _apply(params, x, state, mask)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * w)

    y_closed, state_closed = _apply(params, x, None, mask)
    y_merges, state_merges = _apply(params, x, NormState.fresh(B, G), mask)
    # Equal up to how XLA folds a constant fresh state against a passed one.
    np.testing.assert_allclose(
        np.asarray(y_closed, np.float32), np.asarray(y_merges, np.float32), rtol=1e-6, atol=1e-6
    )
    for a, b in zip(_np_state(state_closed), _np_state(state_merges), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    g_closed = jax.jit(jax.grad(loss))(x, None)
    g_merges = jax.jit(jax.grad(loss))(x, NormState.fresh(B, G))
    assert g_closed.dtype == dtype
    scale = float(jnp.max(jnp.abs(g_merges.astype(jnp.float32))))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(g_closed, np.float32), np.asarray(g_merges, np.float32), atol=tol * scale
    )


def test_fresh_call_gradient_matches_float64_central_differences() -> None:
    """Directional derivatives of the float64 brute force (§4.1), by central differences,
    against the closed-form VJP of a masked call from no state."""
    x = _inputs(60)
    mask = _random_mask(61)
    params = _affine(62)
    rng = np.random.default_rng(63)
    w = rng.normal(size=x.shape)
    fresh = _np_state(NormState.fresh(B, G))

    def loss64(x64: np.ndarray) -> float:
        y, *_ = reference.brute_force(
            x64, params["weight"], params["bias"], G, EPS, np.asarray(mask), fresh
        )
        return float(np.sum(np.sin(y) * w))

    def loss(x):
        return jnp.sum(jnp.sin(_apply(params, x, None, jnp.asarray(mask))[0]) * w)

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)), np.float64)
    h = 1e-4
    for _ in range(2):
        v = rng.normal(size=x.shape)
        x64 = x.astype(np.float64)
        want = (loss64(x64 + h * v) - loss64(x64 - h * v)) / (2 * h)
        np.testing.assert_allclose(np.sum(grad * v), want, rtol=1e-4)
