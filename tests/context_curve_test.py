"""Loss by position in the stream: buckets, the carried and upstream protocols, sliding windows.

Oracles: one forward over the whole stream (the exact carried statistics), a token-by-token
reimplementation of the released code's protocol on the one-token decode path, the scanned
layer layout, and a per-target rederivation of each sliding window.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax import context_curve
from megalodon_flax.llama.model import LlamaLM
from megalodon_flax.megalodon import layer_stack
from megalodon_flax.megalodon.cache import init_cache
from megalodon_flax.megalodon.model import MegalodonLM
from megalodon_flax.training.metrics import token_cross_entropy
from tests.factories import tiny_llama_config, tiny_megalodon_config

pytestmark = pytest.mark.usefixtures("highest_precision")
CHUNK = 8


def test_bucket_edges_double_from_512_and_losses_pool_by_position() -> None:
    assert context_curve.bucket_edges(300) == [0, 300]
    assert context_curve.bucket_edges(3000) == [0, 512, 1024, 2048, 3000]
    assert context_curve.bucket_edges(2048) == [0, 512, 1024, 2048]
    rng = np.random.default_rng(0)
    losses = rng.random((3, 3000))
    pooled = context_curve.PositionLosses.empty(3000, "t")
    for lo in range(0, 3000, 700):  # calls that straddle the bucket edges
        pooled.add(lo, losses[:, lo : lo + 700])
    for i, (lo, hi) in enumerate([(0, 512), (512, 1024), (1024, 2048), (2048, 3000)]):
        assert pooled.count[i] == 3 * (hi - lo)
        np.testing.assert_allclose(pooled.nll[i], losses[:, lo:hi].sum())
    with pytest.raises(ValueError, match="rise from 0 to 10"):
        context_curve.PositionLosses.empty(10, "t", [0, 5, 5, 10])


@pytest.fixture(scope="module")
def megalodon():
    config = tiny_megalodon_config(chunk_size=CHUNK)
    model = MegalodonLM(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(3), jnp.zeros((1, CHUNK), jnp.int32)))
    return config, model, params["params"]


def _stream(length: int, streams: int = 1, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, streams * length, dtype=np.uint8)


def _per_token(length: int) -> list[int]:
    return list(range(length + 1))


def test_exact_protocol_is_one_forward_over_the_whole_stream(megalodon) -> None:
    _, model, params = megalodon
    data = _stream(101, streams=2)
    got = context_curve.carried_position_losses(
        model, params, data, num_streams=2, call_length=24, edges=_per_token(100)
    )
    streams = data.reshape(2, 101).astype(np.int32)
    logits, _ = model.apply({"params": params}, streams[:, :-1])
    want = np.asarray(token_cross_entropy(logits, streams[:, 1:])).sum(axis=0)
    np.testing.assert_allclose(got.nll, want, rtol=2e-5, atol=1e-6)
    assert list(got.count) == [2] * 100


def _brute_force_upstream(model, config, params, stream: np.ndarray) -> np.ndarray:
    """The released protocol one token at a time: calls of two chunks, then after each call
    that ends at or after chunk 8 with more to read, the last 6 chunks rerun from a fresh
    state and their TimestepNorm states replace the carried ones."""
    inputs, targets = stream[None, :-1].astype(np.int32), stream[None, 1:].astype(np.int32)
    length = inputs.shape[1]
    full = length // CHUNK * CHUNK
    step = jax.jit(lambda c, x: model.apply({"params": params}, x, cache=c))
    cache = init_cache(config, 1)
    losses = []
    for t in range(length):
        logits, cache = step(cache, inputs[:, t : t + 1])
        losses.append(float(token_cross_entropy(logits, targets[:, t : t + 1])[0, 0]))
        end = t + 1
        call_ends = end <= full and (end % (2 * CHUNK) == 0 or end == full)
        if call_ends and end >= 8 * CHUNK and (end < full or full < length):
            fresh = init_cache(config, 1)
            for u in range(end - 6 * CHUNK, end):
                _, fresh = step(fresh, inputs[:, u : u + 1])
            layers = [
                old.replace(norm=new.norm)
                for old, new in zip(cache.layers, fresh.layers, strict=True)
            ]
            cache = cache.replace(layers=tuple(layers), final_norm=fresh.final_norm)
    return np.asarray(losses)


@pytest.mark.slow
def test_upstream_protocol_matches_a_token_by_token_reimplementation(megalodon) -> None:
    config, model, params = megalodon
    stream = _stream(12 * CHUNK + 6)  # 12 full chunks and a remainder of 5 inputs
    length = stream.size - 1
    got = context_curve.carried_position_losses(
        model, params, stream, protocol="upstream", edges=_per_token(length)
    )
    want = _brute_force_upstream(model, config, params, stream)
    np.testing.assert_allclose(got.nll, want, rtol=2e-5, atol=1e-6)
    # The statistics differ from the exact ones only after the first rerun (chunk 8).
    exact = context_curve.carried_position_losses(model, params, stream, edges=_per_token(length))
    np.testing.assert_allclose(got.nll[: 8 * CHUNK], exact.nll[: 8 * CHUNK], rtol=2e-5, atol=1e-6)
    assert np.max(np.abs(got.nll[8 * CHUNK :] - exact.nll[8 * CHUNK :])) > 1e-3
    # Scanned layers: the norm states swap inside the stacked cache.
    scanned = config.replace(scan_layers=True)
    got_scanned = context_curve.carried_position_losses(
        MegalodonLM(scanned),
        layer_stack.to_layout(params, True),
        stream,
        protocol="upstream",
        edges=_per_token(length),
    )
    np.testing.assert_allclose(got_scanned.nll, got.nll, rtol=2e-5, atol=1e-6)


def test_sliding_windows_score_each_target_once_from_its_window() -> None:
    config = tiny_llama_config()
    model = LlamaLM(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16), jnp.int32)))["params"]
    data = _stream(45, streams=2, seed=7)
    window, stride = 16, 6
    got = context_curve.windowed_position_losses(
        model, params, data, window=window, stride=stride, num_streams=2, edges=_per_token(44)
    )
    streams = data.reshape(2, 45).astype(np.int32)
    forward = jax.jit(lambda x: model.apply({"params": params}, x)[0])
    want = np.zeros(44)
    for p in range(44):
        # The window of target p: the first one, or the one whose last `stride` holds p.
        lo = 0 if p < window else ((p - window) // stride + 1) * stride
        assert lo <= p < lo + window and (lo == 0 or p >= lo + window - stride)
        # Its bytes lo … p, padded after p (the model is causal) to one compiled shape.
        prefix = np.pad(streams[:, lo : p + 1], ((0, 0), (0, window - (p + 1 - lo))))
        logits = forward(prefix)[:, p - lo : p - lo + 1]
        want[p] = float(token_cross_entropy(logits, streams[:, p + 1 : p + 2]).sum())
    np.testing.assert_allclose(got.nll, want, rtol=2e-5, atol=1e-6)
    assert list(got.count) == [2] * 44
    with pytest.raises(ValueError, match="stride must be in"):
        context_curve.windowed_position_losses(model, params, data, window=16, stride=17)


def _documents(sizes: list[int], seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens of documents of `sizes` one after another, and their segment ids."""
    data = np.random.default_rng(seed).integers(0, 64, sum(sizes), dtype=np.uint8)
    return data, np.repeat(np.arange(1, len(sizes) + 1), sizes)


def test_each_document_is_one_stream_read_alone(megalodon) -> None:
    """Oracle: each document alone in one uncached forward over its whole length."""
    _, model, params = megalodon
    # Shorter than a call, exactly one call of targets, spanning several calls, one token
    # (nothing to predict); more documents than streams.
    sizes = [5, 17, 1, 40, 2, 17, 5]
    data, ids = _documents(sizes)
    calls = []
    got = context_curve.carried_document_losses(
        model,
        params,
        data,
        ids,
        num_streams=3,
        call_length=16,
        edges=_per_token(39),
        progress=lambda done, total: calls.append((done, total)),
    )
    forward = jax.jit(lambda x: model.apply({"params": params}, x)[0])
    want, count = np.zeros(39), np.zeros(39)
    for doc in np.split(data.astype(np.int32), np.cumsum(sizes)[:-1]):
        if doc.size > 1:
            logits = forward(doc[None, :-1])
            want[: doc.size - 1] += np.asarray(token_cross_entropy(logits, doc[None, 1:]))[0]
            count[: doc.size - 1] += 1
    np.testing.assert_allclose(got.nll, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(got.count, count)
    # Groups (40, 17, 17) in 3 calls and (5, 5, 2) in 1; progress counts scored targets.
    targets = sum(n - 1 for n in sizes)
    assert [total for _, total in calls] == [targets] * 4
    assert calls[-1][0] == targets and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_documents_without_a_pair_to_score_are_refused(megalodon) -> None:
    _, model, params = megalodon
    data, ids = _documents([1, 1, 1])
    with pytest.raises(ValueError, match="none of the 3 documents holds two tokens"):
        context_curve.carried_document_losses(model, params, data, ids)
    with pytest.raises(ValueError, match="must match the tokens"):
        context_curve.carried_document_losses(model, params, data, ids[:2])
