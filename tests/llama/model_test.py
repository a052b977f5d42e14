"""Tests of the Llama baseline model (megalodon_flax.llama.model): forward, cache, masks.

Oracles: a float64 NumPy forward written from the architecture's definition, perturbation of
future tokens (causality), the uncached forward for cached decoding and for greedy
generation, and each row run alone for a right-padded batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax import sampling, sharding
from megalodon_flax.llama import LlamaConfig, LlamaLM, init_cache
from tests.factories import tiny_llama_config


@pytest.fixture(scope="module")
def tiny():
    """A tiny float32 model with its norm scales perturbed away from 1."""
    model = LlamaLM(tiny_llama_config())
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        leaf + 0.2 * jax.random.normal(k, leaf.shape) if leaf.ndim == 1 else leaf
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return model, jax.tree.unflatten(treedef, leaves)


def test_parameters_carry_logical_axis_names_known_to_the_rules() -> None:
    model = LlamaLM(tiny_llama_config())
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    known = {name for name, _ in sharding.DEFAULT_LOGICAL_AXIS_RULES}
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)
        assert set(leaf.names) <= known, leaf.names


def _numpy_forward(params, config: LlamaConfig, tokens: np.ndarray) -> np.ndarray:
    """float64 logits (B, L, V): pre-norm blocks, half-split RoPE, causal softmax, SwiGLU."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    heads, dh = config.num_heads, config.head_dim

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.norm_eps) * scale

    length = tokens.shape[1]
    pos = np.arange(length, dtype=np.float64)
    freqs = config.rope_base ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)
    cos, sin = np.cos(pos[:, None] * freqs), np.sin(pos[:, None] * freqs)

    def rope(x):  # (B, L, H, Dh)
        a, b = x[..., : dh // 2], x[..., dh // 2 :]
        c, s = cos[None, :, None], sin[None, :, None]
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    x = p["embedding"][tokens]
    mask = np.tril(np.ones((length, length), bool))
    for i in range(config.num_layers):
        layer = p[f"layers_{i}"]
        att = layer["attention"]
        h = rms(x, layer["attention_norm"]["scale"])
        q, k, v = (
            (h @ att[n]["kernel"]).reshape(*h.shape[:2], heads, dh) for n in ("wq", "wk", "wv")
        )
        q, k = rope(q), rope(k)
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        logits = np.where(mask, logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        x = x + out @ att["wo"]["kernel"]
        ffn = layer["ffn"]
        h = rms(x, layer["ffn_norm"]["scale"])
        a = h @ ffn["w1"]["kernel"]
        a = a / (1 + np.exp(-a)) * (h @ ffn["w3"]["kernel"])
        x = x + a @ ffn["w2"]["kernel"]
    return rms(x, p["norm"]["scale"]) @ p["embedding"].T


def test_forward_matches_float64_numpy_oracle(tiny) -> None:
    model, params = tiny
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 24), 0, 64))
    with jax.default_matmul_precision("highest"):
        logits, cache = model.apply({"params": params}, tokens)
    assert cache is None and logits.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(logits), _numpy_forward(params, model.config, tokens), atol=2e-4, rtol=1e-4
    )


def test_future_tokens_do_not_change_past_logits(tiny) -> None:
    model, params = tiny
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, 64)
    base, _ = model.apply({"params": params}, tokens)
    for j in (0, 13, 31):
        changed = tokens.at[:, j].set((tokens[:, j] + 5) % 64)
        logits, _ = model.apply({"params": params}, changed)
        np.testing.assert_array_equal(np.asarray(logits[:, :j]), np.asarray(base[:, :j]))
        assert float(jnp.abs(logits[:, j:] - base[:, j:]).max()) > 1e-3


def test_cached_prefill_and_decode_equal_the_full_forward(tiny) -> None:
    model, params = tiny
    tokens = jax.random.randint(jax.random.key(4), (2, 20), 0, 64)
    full, _ = model.apply({"params": params}, tokens)
    cache = init_cache(model.config, 2, 20)
    parts = []
    for lo, hi in ((0, 11), (11, 12), (12, 17), (17, 20)):
        logits, cache = model.apply({"params": params}, tokens[:, lo:hi], cache=cache)
        parts.append(logits)
    assert int(cache.length) == 20
    np.testing.assert_allclose(np.concatenate(parts, 1), np.asarray(full), atol=2e-5)


def test_right_padded_batch_gives_the_unpadded_logits(tiny) -> None:
    """With `attention_mask`, each row's valid positions equal the row run alone, unpadded."""
    model, params = tiny
    lengths = (20, 13, 1)
    tokens = np.asarray(jax.random.randint(jax.random.key(6), (3, 20), 0, 64))
    mask = np.arange(20)[None, :] < np.asarray(lengths)[:, None]
    with jax.default_matmul_precision("highest"):
        padded, cache = model.apply({"params": params}, tokens, attention_mask=mask)
        assert cache is None and padded.shape == (3, 20, 64)
        for row, n in enumerate(lengths):
            alone, _ = model.apply({"params": params}, tokens[row : row + 1, :n])
            np.testing.assert_allclose(
                np.asarray(padded[row, :n]), np.asarray(alone[0]), atol=1e-5, rtol=1e-5
            )
        assert np.isfinite(np.asarray(padded)).all()
        # An all-valid mask is no mask; an integer mask is read as booleans.
        full, _ = model.apply({"params": params}, tokens)
        ones, _ = model.apply({"params": params}, tokens, attention_mask=np.ones((3, 20), int))
        np.testing.assert_allclose(np.asarray(ones), np.asarray(full), atol=1e-6)
        as_int, _ = model.apply({"params": params}, tokens, attention_mask=mask.astype(np.int32))
        np.testing.assert_array_equal(np.asarray(as_int), np.asarray(padded))

        # Padded keys are never attended: changing the padding token at position 15 of row 1
        # changes only position 15 itself (its own residual), not the later padded positions,
        # which it would reach through attention without the mask.
        changed = tokens.copy()
        changed[1, 15] = (changed[1, 15] + 7) % 64
        masked, _ = model.apply({"params": params}, changed, attention_mask=mask)
        unmasked, _ = model.apply({"params": params}, changed)
    masked, unmasked, padded = np.asarray(masked), np.asarray(unmasked), np.asarray(padded)
    np.testing.assert_array_equal(masked[[0, 2]], padded[[0, 2]])
    np.testing.assert_allclose(masked[1, :15], padded[1, :15], atol=1e-6)
    np.testing.assert_allclose(masked[1, 16:], padded[1, 16:], atol=1e-6)
    assert np.abs(masked[1, 15] - padded[1, 15]).max() > 1e-3
    assert np.abs(unmasked[1, 16:] - np.asarray(full)[1, 16:]).max() > 1e-3


def test_attention_mask_is_refused_with_a_cache_or_a_wrong_shape(tiny) -> None:
    model, params = tiny
    tokens = jnp.zeros((2, 5), jnp.int32)
    cache = init_cache(model.config, 2, 8)
    with pytest.raises(ValueError, match="cannot be combined with a cache"):
        model.apply({"params": params}, tokens, cache=cache, attention_mask=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\)"):
        model.apply({"params": params}, tokens, attention_mask=jnp.ones((2, 4)))
    with pytest.raises(TypeError):  # keyword-only after the tokens
        model.apply({"params": params}, tokens, cache)


def test_greedy_generation_equals_argmax_of_the_growing_forward(tiny) -> None:
    model, params = tiny
    prompt = jax.random.randint(jax.random.key(5), (2, 6), 0, 64)
    new = sampling.generate(model, params, prompt, 12, jax.random.key(0), temperature=0.0)
    sequence = np.asarray(prompt)
    for t in range(12):
        logits, _ = model.apply({"params": params}, sequence)
        nxt = np.asarray(jnp.argmax(logits[:, -1], -1))
        np.testing.assert_array_equal(np.asarray(new[:, t]), nxt)
        sequence = np.concatenate([sequence, nxt[:, None]], 1)
