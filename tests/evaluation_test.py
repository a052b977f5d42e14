"""Streaming and window evaluation (megalodon_flax.evaluation) against one-shot forwards.

Oracle: one uncached forward over the whole stream (or each window), summed in float64.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax import MegalodonLM
from megalodon_flax.data.pipeline import eval_batches
from megalodon_flax.evaluation import stream_eval, window_eval
from megalodon_flax.training.setup import setup_training
from tests.factories import tiny_megalodon_config, tiny_train_config

CONFIG = tiny_megalodon_config(vocab_size=256)


@pytest.fixture(scope="module")
def model_and_params():
    model = MegalodonLM(CONFIG)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    noisy = jax.tree.map(
        lambda p, k: p + 0.05 * jax.random.normal(k, p.shape),
        params,
        jax.tree.unflatten(
            jax.tree.structure(params),
            list(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))),
        ),
    )
    return model, noisy


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, inputs: jax.Array) -> jax.Array:
    return model.apply({"params": params}, inputs)[0]


def _one_shot_nll(model, params, stream: np.ndarray) -> float:
    """Sum of -log p(x[t+1] | x[:t+1]) from one uncached forward over the whole stream."""
    logits = _logits(model, params, jnp.asarray(stream[None, :-1], jnp.int32))
    logp = np.asarray(jax.nn.log_softmax(logits[0]), np.float64)
    return float(-logp[np.arange(stream.size - 1), stream[1:]].sum())


@pytest.mark.parametrize("call_length", [pytest.param(5, marks=pytest.mark.slow), 8, 37])
def test_stream_equals_one_shot(model_and_params, call_length):
    model, params = model_and_params
    data = np.random.default_rng(0).integers(0, 256, 301).astype(np.uint8)
    result = stream_eval(model, params, data, call_length=call_length)
    assert result.num_tokens == 300
    np.testing.assert_allclose(result.nll_sum, _one_shot_nll(model, params, data), rtol=2e-5)
    np.testing.assert_allclose(result.bits_per_byte, result.nll_sum / 300 / np.log(2), rtol=1e-12)


@pytest.mark.slow
def test_parallel_streams_are_independent_streams(model_and_params):
    model, params = model_and_params
    data = np.random.default_rng(1).integers(0, 256, 203).astype(np.uint8)
    result = stream_eval(model, params, data, call_length=16, num_streams=2)
    halves = data[:202].reshape(2, 101)
    expected = sum(_one_shot_nll(model, params, h) for h in halves)
    assert result.num_tokens == 200
    np.testing.assert_allclose(result.nll_sum, expected, rtol=2e-5)


def test_documents_are_streams_each_scored_alone(model_and_params):
    """Oracle: the sum over documents of each one alone in one uncached forward; with
    `max_bytes`, the documents before the cut and the cut one up to it."""
    model, params = model_and_params
    sizes = [30, 7, 50, 7, 30]  # more documents than streams, shorter than a call, longer
    data = np.random.default_rng(3).integers(0, 256, sum(sizes)).astype(np.uint8)
    segment_ids = np.repeat(np.arange(1, 6), sizes)
    docs = np.split(data, np.cumsum(sizes)[:-1])
    result = stream_eval(
        model, params, data, segment_ids=segment_ids, call_length=16, num_streams=2
    )
    assert result.num_tokens == data.size - len(sizes)
    expected = sum(_one_shot_nll(model, params, d) for d in docs)
    np.testing.assert_allclose(result.nll_sum, expected, rtol=2e-5)
    cut = stream_eval(
        model, params, data, segment_ids=segment_ids, call_length=16, num_streams=2, max_bytes=57
    )
    assert cut.num_tokens == 29 + 6 + 19
    expected = sum(_one_shot_nll(model, params, d) for d in [docs[0], docs[1], docs[2][:20]])
    np.testing.assert_allclose(cut.nll_sum, expected, rtol=2e-5)


def test_window_eval_matches_independent_windows(model_and_params):
    model, params = model_and_params
    seq_len = 12
    data = np.random.default_rng(2).integers(0, 256, 100).astype(np.uint8)
    # The training setup's compiled eval step for this very model; the oracle below calls
    # `model.apply` directly on each window.
    config = tiny_train_config(seq_len=seq_len, eval={"batch_size": 3})
    setup = setup_training(dataclasses.replace(config, model=CONFIG))
    assert setup.model == model
    batches = eval_batches(data, seq_len=seq_len, global_batch_size=3)
    result = window_eval(setup.eval_step, params, batches)
    expected, count = 0.0, 0
    for start in range(0, data.size - 1, seq_len):
        window = data[start : start + seq_len + 1]
        expected += _one_shot_nll(model, params, window)
        count += window.size - 1
    assert result.num_tokens == count == data.size - 1
    np.testing.assert_allclose(result.nll_sum, expected, rtol=2e-5)


def test_stream_rejects_too_little_data(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match="too few"):
        stream_eval(model, params, np.zeros(3, np.uint8), num_streams=2)
