"""Packed rows (spec §5.7): each component over a packed row against its float64 oracle run on
every document alone, and the whole model (logits and gradients) against each document run
alone (`tests/packed_rows.py` describes the layout; chunks of 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from megalodon_flax.layers.rotary import apply_rope, rope_frequencies
from megalodon_flax.layers.segments import packed_target_weights, segments_from_ids
from megalodon_flax.megalodon import cema, cema_powers, cema_resets
from megalodon_flax.megalodon.chunked_attention import packed_chunked_attention
from megalodon_flax.megalodon.model import MegalodonLM
from megalodon_flax.megalodon.timestep_norm import TimestepNorm
from tests.factories import tiny_megalodon_config
from tests.megalodon.cema_test import PARAM_NAMES, _random_params
from tests.packed_rows import DOCS, IDS, L, documents_alone, packed_tokens
from tests.reference import attention as attention_reference
from tests.reference import cema as cema_reference
from tests.reference import timestep_norm as norm_reference

pytestmark = pytest.mark.usefixtures("highest_precision")

CHUNK = 8


def test_run_layout_matches_a_loop():
    seg = segments_from_ids(jnp.asarray(IDS))
    starts = np.zeros_like(IDS, bool)
    position = np.zeros_like(IDS)
    for b, row in enumerate(IDS):
        for t in range(L):
            starts[b, t] = t == 0 or row[t] != row[t - 1]
            position[b, t] = 0 if starts[b, t] else position[b, t - 1] + 1
    np.testing.assert_array_equal(np.asarray(seg.starts), starts)
    np.testing.assert_array_equal(np.asarray(seg.position), position)
    np.testing.assert_array_equal(np.asarray(seg.valid), IDS > 0)
    np.testing.assert_array_equal(np.asarray(seg.run_start), np.arange(L) - position)

    weights = np.asarray(packed_target_weights(jnp.asarray(IDS)))
    expected = np.zeros((2, L - 1), np.float32)
    for b, start, end in DOCS:
        expected[b, start : end - 1] = 1.0  # input t predicts t + 1 inside the run
    np.testing.assert_array_equal(weights, expected)


@pytest.mark.parametrize(
    "path, block", [("fft", None), ("fft", 5), ("scan", None), ("sequential", None)]
)
def test_cema_resets_at_every_run_start(path, block):
    dim = 12
    params = _random_params(3, dim=dim, ndim=4)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, dim, L)).astype(np.float32)
    seg = segments_from_ids(jnp.asarray(IDS))
    coeffs = cema_powers.cema_coefficients(*(jnp.asarray(params[n]) for n in PARAM_NAMES[:5]))
    x_valid = jnp.where(seg.valid[:, None, :], jnp.asarray(x), 0.0)
    if block is None:
        y, _ = cema.cema(coeffs, jnp.asarray(params["omega"]), x_valid, path=path, segments=seg)
    else:
        y = cema_resets.cema_blocked_resets(coeffs, x_valid, seg.position, block)
        y = y + jnp.asarray(params["omega"])[:, None] * x_valid
    y = np.asarray(y)
    for b, start, end in DOCS:
        expected, _ = cema_reference.recurrence(params, x[b : b + 1, :, start:end])
        np.testing.assert_allclose(y[b, :, start:end], expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block, cut", [(16, 0), (5, 0), (5, 7), (16, 21)])
def test_blocked_resets_final_state_is_the_last_runs(block, cut):
    """The state after the last timestep counts from the last run start; a row cut inside a
    run (positions > t, as in a context shard) counts from a zero state before the cut."""
    dim = 12
    params = _random_params(3, dim=dim, ndim=4)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, dim, L)).astype(np.float32)
    seg = segments_from_ids(jnp.asarray(IDS))
    x = np.where(np.asarray(seg.valid)[:, None, :], x, 0.0).astype(np.float32)
    coeffs = cema_powers.cema_coefficients(*(jnp.asarray(params[n]) for n in PARAM_NAMES[:5]))
    position = np.asarray(seg.position)[:, cut:]
    y, state = cema_resets.cema_blocked_resets(
        coeffs, jnp.asarray(x[..., cut:]), jnp.asarray(position), block, return_state=True
    )
    omega = params["omega"].astype(np.float64)[:, None]
    for b in range(2):
        t = L - 1 - cut
        start = cut + max(0, t - int(position[b, t]))
        expected_y, states = cema_reference.recurrence(params, x[b : b + 1, :, start:])
        np.testing.assert_allclose(state[b], states[-1][0], rtol=1e-5, atol=1e-5)
        first = start - cut
        got = np.asarray(y[b, :, first:]) + omega * x[b, :, start:]
        np.testing.assert_allclose(got, expected_y[0], rtol=1e-5, atol=1e-5)


def test_timestep_norm_restarts_at_every_run_start():
    dim, groups = 16, 4
    rng = np.random.default_rng(5)
    x = (3.0 * rng.normal(size=(2, L, dim)) + 2.0).astype(np.float32)
    x[IDS == 0] = np.nan  # padding values must never reach the statistics
    weight = (0.3 * rng.normal(size=dim)).astype(np.float32)
    bias = rng.normal(size=dim).astype(np.float32)
    norm = TimestepNorm(groups, 1e-5)
    variables = {"params": {"weight": jnp.asarray(weight), "bias": jnp.asarray(bias)}}
    seg = segments_from_ids(jnp.asarray(IDS))
    y, state = norm.apply(variables, jnp.asarray(x), segments=seg)
    y = np.asarray(y)
    assert state is None
    np.testing.assert_array_equal(y[IDS == 0], 0.0)
    for b, start, end in DOCS:
        expected, *_ = norm_reference.brute_force(
            x[b : b + 1, start:end], weight, bias, groups, 1e-5
        )
        np.testing.assert_allclose(y[b, start:end], expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [CHUNK, 6])  # query blocks of C/4, or whole chunks
def test_attention_and_rope_stay_inside_each_run_and_its_chunk_grid(chunk):
    heads, width = 2, 8
    rng = np.random.default_rng(6)
    q, k, v = (rng.normal(size=(2, L, heads, width)).astype(np.float32) for _ in range(3))
    seg = segments_from_ids(jnp.asarray(IDS))
    freqs = rope_frequencies(width, 10_000.0)
    positions = seg.position % chunk
    q_rot = apply_rope(jnp.asarray(q), positions, freqs)
    k_rot = apply_rope(jnp.asarray(k), positions, freqs)
    out = np.asarray(packed_chunked_attention(q_rot, k_rot, jnp.asarray(v), chunk, seg))
    np.testing.assert_array_equal(out[IDS == 0], 0.0)
    freqs64 = np.asarray(freqs)
    for b, start, end in DOCS:
        local = np.arange(end - start) % chunk
        q_doc = attention_reference.rope(q[b : b + 1, start:end], local, freqs64, "adjacent")
        k_doc = attention_reference.rope(k[b : b + 1, start:end], local, freqs64, "adjacent")
        expected = attention_reference.dense_chunked_attention(
            q_doc, k_doc, v[b : b + 1, start:end], chunk
        )
        np.testing.assert_allclose(out[b, start:end], expected[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ the whole model

MODEL_VARIANTS = {
    "fft": tiny_megalodon_config(chunk_size=CHUNK),
    "scan_layers_associative": tiny_megalodon_config(
        chunk_size=CHUNK, cema_path="scan", scan_layers=True
    ),
}


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_packed_logits_equal_each_document_alone(variant):
    model = MegalodonLM(MODEL_VARIANTS[variant])
    tokens = packed_tokens()
    variables = model.init(jax.random.key(0), jnp.asarray(tokens))
    packed, cache = jax.jit(model.apply)(
        variables, jnp.asarray(tokens), segment_ids=jnp.asarray(IDS)
    )
    packed = np.asarray(packed)
    assert cache is None
    assert np.isfinite(packed).all()
    rows, mask = documents_alone(tokens)
    alone, _ = jax.jit(model.apply)(variables, jnp.asarray(rows), attention_mask=mask)
    alone = np.asarray(alone)
    for i, (b, start, end) in enumerate(DOCS):
        np.testing.assert_allclose(packed[b, start:end], alone[i, : end - start], atol=1e-5)


def test_packed_gradient_equals_sum_of_document_gradients():
    model = MegalodonLM(MODEL_VARIANTS["fft"])
    tokens = packed_tokens()
    params = model.init(jax.random.key(1), jnp.asarray(tokens))["params"]

    def loss(p, inputs, targets, weights, **kwargs):
        logits, _ = model.apply({"params": p}, inputs, **kwargs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * weights)

    grad = jax.jit(jax.value_and_grad(loss))
    total, grads = grad(
        params,
        jnp.asarray(tokens[:, :-1]),
        jnp.asarray(tokens[:, 1:]),
        packed_target_weights(jnp.asarray(IDS)),
        segment_ids=jnp.asarray(IDS[:, :-1]),
    )
    rows, mask = documents_alone(tokens)
    # Each document's own next-token loss: its targets inside the document only.
    expected_total, expected = grad(
        params,
        jnp.asarray(rows[:, :-1]),
        jnp.asarray(rows[:, 1:]),
        jnp.asarray(mask[:, 1:], jnp.float32),
        attention_mask=jnp.asarray(mask[:, :-1]),
    )
    np.testing.assert_allclose(float(total), float(expected_total), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        scale = float(jnp.max(jnp.abs(want))) + 1e-6
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0)


def test_packed_rows_refuse_what_they_cannot_take():
    model = MegalodonLM(MODEL_VARIANTS["fft"])
    tokens = jnp.asarray(packed_tokens())
    variables = model.init(jax.random.key(0), tokens)
    ids = jnp.asarray(IDS)
    with pytest.raises(ValueError, match="attention_mask"):
        model.apply(variables, tokens, segment_ids=ids, attention_mask=ids > 0)
    with pytest.raises(ValueError, match="return_cache"):
        model.apply(variables, tokens, segment_ids=ids, return_cache=True)
    with pytest.raises(ValueError, match=">= 0"):
        model.apply(variables, tokens, segment_ids=ids.at[0, 3].set(-1))
    with pytest.raises(ValueError, match="shape"):
        model.apply(variables, tokens, segment_ids=ids[:, :-1])
    with pytest.raises(ValueError, match="integers"):
        model.apply(variables, tokens, segment_ids=ids.astype(jnp.float32))
