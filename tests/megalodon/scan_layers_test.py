"""Scanned layers (`scan_layers=True`) against the unrolled stack, and the layout conversion.

Oracles: the unrolled model (a second code path) run with the same weights, stacked by hand
or by `layer_stack`; the per-layer FFN rescale formula; the unrolled optimizer mask.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax import generate
from megalodon_flax.megalodon import layer_stack
from megalodon_flax.megalodon.cache import init_cache
from megalodon_flax.megalodon.convert import from_state_dict, to_state_dict
from megalodon_flax.megalodon.model import MegalodonLM
from megalodon_flax.training.optimizer import _matrix_mask
from tests.factories import tiny_megalodon_config

CFG = tiny_megalodon_config(num_layers=3, rescale_nffn=True)
SCANNED = CFG.replace(scan_layers=True)


def _tokens(length: int, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (2, length), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def unrolled_params():
    variables = jax.jit(MegalodonLM(CFG).init)(jax.random.PRNGKey(0), _tokens(8))
    params = nn.unbox(variables)["params"]
    rng = np.random.default_rng(0)  # perturb so that every layer differs from the others
    return jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), params)


def _by_hand(params):
    """The stacked tree built without `layer_stack`: np.stack of layers_0..layers_{L-1}."""
    model = dict(params["model"])
    blocks = [model.pop(f"layers_{i}") for i in range(CFG.num_layers)]
    model["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return {**params, "model": model}


def test_scanned_init_stacks_layers_with_logical_axis_and_per_layer_rescale() -> None:
    boxed = jax.jit(MegalodonLM(SCANNED).init)(jax.random.PRNGKey(0), _tokens(8))["params"]
    layers = boxed["model"]["layers"]
    assert "layers_0" not in boxed["model"]
    kernel = layers["attn"]["wz"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == ("layers", "embed", "qk")
    assert kernel.value.shape[0] == CFG.num_layers
    alpha = nn.unbox(layers["ffn"]["alpha"])
    want = 0.1 * 0.5 ** np.arange(CFG.num_layers)[:, None] * np.ones(alpha.shape)
    np.testing.assert_allclose(alpha, want, rtol=1e-7)
    # Independent initial weights per layer (split rngs), like the unrolled model.
    w = np.asarray(kernel.value)
    assert not np.allclose(w[0], w[1])


def test_layer_stack_matches_hand_stacking_and_round_trips(unrolled_params) -> None:
    stacked = layer_stack.stack_layers(unrolled_params)
    by_hand = _by_hand(unrolled_params)
    assert jax.tree.structure(stacked) == jax.tree.structure(by_hand)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(by_hand), strict=True):
        np.testing.assert_array_equal(a, b)
    back = layer_stack.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled_params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(unrolled_params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert layer_stack.layout_of(stacked) == "scanned"
    assert layer_stack.layout_of(unrolled_params) == "unrolled"
    assert layer_stack.to_layout(stacked, scan_layers=True) is stacked


def test_scanned_logits_and_gradients_equal_unrolled(unrolled_params) -> None:
    tokens = _tokens(3 * CFG.chunk_size + 3)
    stacked = _by_hand(unrolled_params)

    def loss(model, params):
        logits = model.apply({"params": params}, tokens)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    def grad(model):
        return jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))

    (l0, z0), g0 = grad(MegalodonLM(CFG))(unrolled_params)
    (l1, z1), g1 = grad(MegalodonLM(SCANNED))(stacked)
    np.testing.assert_allclose(z1, z0, atol=2e-6, rtol=0)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    g0_stacked = _by_hand(g0)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0_stacked), strict=True
    ):
        scale = float(np.max(np.abs(b))) + 1e-12
        assert float(np.max(np.abs(np.asarray(a) - b))) <= 1e-5 * scale, jax.tree_util.keystr(path)


def test_scanned_streaming_cache_and_generation_equal_unrolled(unrolled_params) -> None:
    stacked = layer_stack.stack_layers(unrolled_params)
    tokens = _tokens(2 * CFG.chunk_size + 5)
    unrolled = MegalodonLM(CFG)
    full, unrolled_cache = jax.jit(functools.partial(unrolled.apply, return_cache=True))(
        {"params": unrolled_params}, tokens
    )
    model = MegalodonLM(SCANNED)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    cache = init_cache(SCANNED, 2)
    assert cache.layers.cema.shape[0] == CFG.num_layers
    parts = []
    for a, b in ((0, 5), (5, 6), (6, tokens.shape[1])):
        logits, cache = step(stacked, tokens[:, a:b], cache)
        parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=2e-5, rtol=0)
    assert int(cache.position) == tokens.shape[1]
    # The stacked cache holds the unrolled model's per-layer state.
    for mine, want in zip(cache.layer_caches(), unrolled_cache.layer_caches(), strict=True):
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    prompt = tokens[:, :7]
    key = jax.random.PRNGKey(3)
    out_scanned = generate(model, stacked, prompt, 6, key, temperature=0.0)
    out_unrolled = generate(unrolled, unrolled_params, prompt, 6, key, temperature=0.0)
    np.testing.assert_array_equal(out_scanned, out_unrolled)


def test_unrolled_cache_for_a_scanned_model_is_refused(unrolled_params) -> None:
    stacked = layer_stack.stack_layers(unrolled_params)
    with pytest.raises(ValueError, match="scan_layers is on"):
        MegalodonLM(SCANNED).apply({"params": stacked}, _tokens(4), cache=init_cache(CFG, 2))
    with pytest.raises(ValueError, match=r"stacked layers but config\.num_layers"):
        MegalodonLM(CFG).apply(
            {"params": unrolled_params}, _tokens(4), cache=init_cache(SCANNED, 2)
        )


@pytest.mark.parametrize("fmt", ["hf", "upstream"])
def test_conversion_both_directions_with_scanned_layers(unrolled_params, fmt) -> None:
    cfg = CFG.replace(bias_topology="upstream", tie_policy="explicit") if fmt == "upstream" else CFG
    params = jax.jit(MegalodonLM(cfg).init)(jax.random.PRNGKey(2), _tokens(8))["params"]
    params = nn.unbox(params)
    exported = to_state_dict(params, cfg, fmt)
    from_scanned = to_state_dict(
        layer_stack.stack_layers(params), cfg.replace(scan_layers=True), fmt
    )
    assert set(exported) == set(from_scanned)
    for name, value in exported.items():
        np.testing.assert_array_equal(from_scanned[name], value, err_msg=name)
    imported = from_state_dict(exported, cfg.replace(scan_layers=True), fmt)
    assert layer_stack.layout_of(imported) == "scanned"
    want = _by_hand(jax.tree.map(np.asarray, params))
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_weight_decay_mask_ignores_the_layer_axis(unrolled_params) -> None:
    mask = _matrix_mask(unrolled_params)
    scanned_mask = _matrix_mask(layer_stack.stack_layers(unrolled_params))
    stacked_mask = _by_hand(jax.tree.map(np.asarray, mask))  # per-layer flags, all equal
    want = [bool(np.all(x)) for x in jax.tree.leaves(stacked_mask)]
    assert jax.tree.leaves(scanned_mask) == want
    assert any(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))
