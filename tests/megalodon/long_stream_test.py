"""Streams without a length limit: counters past 2^31, statistics after 10^8 timesteps, and
positions that wrap.

Oracles: Chan merges of the same timesteps in float64 with exact integer counts, and the same
tokens streamed from an equivalent short position.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.megalodon.cache import POSITION_WRAP, init_cache
from megalodon_flax.megalodon.model import MegalodonLM
from megalodon_flax.megalodon.timestep_norm import COUNT_LIMB, NormState, TimestepNorm
from tests.factories import tiny_megalodon_config

G, GS = 2, 4


class Float64Stats:
    """Running (count, mean, M2) per group in float64, merged call by call."""

    def __init__(self, count: int, mean: np.ndarray, var: np.ndarray) -> None:
        self.n, self.mean, self.m2 = float(count), mean.astype(np.float64), var * float(count)

    def absorb(self, x: np.ndarray) -> None:
        """x (L, G·gs) float32 timesteps, all valid."""
        xg = x.astype(np.float64).reshape(x.shape[0], G, GS)
        blk_mean, blk_var = xg.mean(-1), xg.var(-1)
        n1, m1 = x.shape[0], blk_mean.mean(0)
        big_m1 = (blk_var + (blk_mean - m1) ** 2).sum(0)
        delta, total = m1 - self.mean, self.n + n1
        self.mean = self.mean + delta * n1 / total
        self.m2 = self.m2 + big_m1 + delta * delta * self.n * n1 / total
        self.n = total

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.n


def _stream(state: NormState, calls: np.ndarray) -> tuple[NormState, list[np.ndarray]]:
    norm = TimestepNorm(G)
    params = norm.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, G * GS)))
    step = jax.jit(lambda s, x: norm.apply(params, x, s))
    outputs = []
    for x in calls:
        y, state = step(state, jnp.asarray(x[None], jnp.float32))
        outputs.append(np.asarray(y[0]))
    return state, outputs


def _start(count: int, mean: float, var: float) -> NormState:
    full = (1, G)
    return NormState.uncompensated(
        jnp.full((1,), count, jnp.int32), jnp.full(full, mean, jnp.float32), jnp.full(full, var)
    )


def test_a_stream_crossing_two_to_the_31_timesteps_keeps_count_and_statistics() -> None:
    start = 2**31 - 100
    rng = np.random.default_rng(0)
    calls = rng.normal(3.0, 2.0, (3, 128, G * GS)).astype(np.float32)
    state, outputs = _stream(_start(start, 2.5, 4.0), calls)
    total = start + 3 * 128
    assert int(state.count_high[0]) * COUNT_LIMB + int(state.count[0]) == total
    assert int(state.count_high[0]) == 2  # an int32 count would have wrapped negative
    oracle = Float64Stats(start, np.full(G, 2.5), np.full(G, 4.0))
    for x, y in zip(calls, outputs, strict=True):
        # The normalized output of each timestep: its statistics include every earlier one.
        xg = x.astype(np.float64).reshape(-1, G, GS)
        for t in range(0, x.shape[0], 37):
            step_stats = Float64Stats(int(oracle.n), oracle.mean, oracle.var)
            step_stats.absorb(x[: t + 1])
            want = (xg[t] - step_stats.mean[:, None]) / np.sqrt(step_stats.var[:, None] + 1e-5)
            np.testing.assert_allclose(y[t].reshape(G, GS), want, atol=1e-5)
        oracle.absorb(x)
    mean = np.asarray(state.mean[0], np.float64) + np.asarray(state.mean_c[0])
    var = np.asarray(state.var[0], np.float64) + np.asarray(state.var_c[0])
    np.testing.assert_allclose(mean, oracle.mean, rtol=1e-9)
    np.testing.assert_allclose(var, oracle.var, rtol=1e-9)


@pytest.mark.slow
def test_statistics_after_1e8_timesteps_follow_a_drifting_mean() -> None:
    """A state of 10^8 timesteps (mean 100, variance 1) absorbs 2,000 calls of 512 timesteps
    with mean 100.5: each call moves the mean by 2.6e-6, below half a float32 ulp of 100
    (3.8e-6), so an uncompensated mean would not move at all (measured: it lost the whole
    5.1e-3 movement and 1% of the variance's). The compensated state stays within 1e-9
    (relative) of the float64 oracle."""
    rng = np.random.default_rng(1)
    calls = rng.normal(100.5, 1.0, (2000, 512, G * GS)).astype(np.float32)
    state, _ = _stream(_start(10**8, 100.0, 1.0), calls)
    oracle = Float64Stats(10**8, np.full(G, 100.0), np.full(G, 1.0))
    for x in calls:
        oracle.absorb(x)
    assert np.all(oracle.mean - 100.0 > 5e-3)
    mean = np.asarray(state.mean[0], np.float64) + np.asarray(state.mean_c[0])
    var = np.asarray(state.var[0], np.float64) + np.asarray(state.var_c[0])
    np.testing.assert_allclose(mean, oracle.mean, rtol=1e-9)
    np.testing.assert_allclose(var, oracle.var, rtol=1e-9)


def test_position_wraps_by_whole_chunks_and_the_stream_is_unchanged() -> None:
    """The same cache at position 13 and at 13 + M − 8 (M = the wrap span, a multiple of the
    chunk size 8) continues identically; the second crosses the wrap and lands on 15."""
    config = tiny_megalodon_config(chunk_size=8)
    model = MegalodonLM(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(2), jnp.zeros((1, 8), jnp.int32)))
    tokens = np.random.default_rng(3).integers(0, 64, (1, 23)).astype(np.int32)
    run = jax.jit(lambda c, t: model.apply(params, t, cache=c))
    _, cache = run(init_cache(config, 1), tokens[:, :13])
    span = POSITION_WRAP // 8 * 8
    far = cache.replace(
        layers=tuple(layer.replace(position=layer.position + span - 8) for layer in cache.layers)
    )
    near_logits, near = run(cache, tokens[:, 13:])
    far_logits, far = run(far, tokens[:, 13:])
    np.testing.assert_allclose(np.asarray(far_logits), np.asarray(near_logits), atol=1e-6)
    assert int(near.position) == 23 and int(far.position) == 15  # 23 ≡ 15 (mod 8)
    one_near, _ = run(near, tokens[:, :1])  # the one-token decode path
    one_far, _ = run(far, tokens[:, :1])
    np.testing.assert_allclose(np.asarray(one_far), np.asarray(one_near), atol=1e-6)
