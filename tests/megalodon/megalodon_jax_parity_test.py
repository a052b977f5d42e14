"""Logits parity against an external implementation: megalodon-jax 0.2.2 (JAX + Equinox).

megalodon-jax implements the released upstream equations with the upstream parameter
topology, so our model built with `bias_topology='upstream', tie_policy='explicit'` maps onto
it tensor by tensor (`tests/reference/megalodon_jax_bridge.py`). Random parameters from our
initializers are perturbed (so gamma_imag, every norm affine and the Q/K gamma/beta are
non-zero), copied into megalodon-jax, and both models run in float32 at matmul precision
HIGHEST on random tokens: one chunk, several chunks plus a partial one, a streaming split
through both models' caches (final caches compared too), and megalodon-jax's greedy
`generate`.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.megalodon.cache import init_cache
from megalodon_flax.megalodon.chunked_attention import ring_entries
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.model import MegalodonLM
from tests.factories import tiny_megalodon_config
from tests.reference import megalodon_jax_bridge as bridge

# Optional dependencies (the `test` extra): the module is skipped without them.
mjax = pytest.importorskip("megalodon_jax")
eqx = pytest.importorskip("equinox")
model_state_dict = pytest.importorskip("megalodon_jax.checkpoint").model_state_dict

pytestmark = pytest.mark.usefixtures("highest_precision")

ATOL = 1e-4
BATCH = 2
# The sizes of these tests in the topology megalodon-jax implements (V=97, C=16, G=8).
base_config = functools.partial(
    tiny_megalodon_config,
    vocab_size=97,
    model_dim=64,
    z_dim=32,
    value_dim=64,
    ffn_hidden_dim=96,
    chunk_size=16,
    norm_num_groups=8,
    bias_topology="upstream",
    tie_policy="explicit",
)
CASES = {
    "swiglu_untied": dict(swiglu=True),
    "silu_rescale_rope500": dict(swiglu=False, rescale_nffn=True, rope_base=500.0),
    "tied_scale_emb": dict(swiglu=True, share_emb=True, scale_emb=True),
}
# Each forward of a new shape compiles both models (several seconds on 2 cores): the main
# case runs by default, the variants are marked slow.
FORWARD_CASES = [
    "swiglu_untied",
    pytest.param("silu_rescale_rope500", marks=pytest.mark.slow),
    pytest.param("tied_scale_emb", marks=pytest.mark.slow),
]
ONE_CHUNK = 11


class Pair(NamedTuple):
    """Our config/params and the megalodon-jax model loaded with the same weights."""

    cfg: MegalodonConfig
    params: dict[str, Any]
    ours: Any  # jitted (params, tokens) -> logits
    theirs_model: Any
    theirs: Any  # jitted (model, tokens) -> logits


def perturb(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Adds noise to every leaf: kernels/embeddings by half their std, others by N(0, 0.2²),
    gamma_imag by N(0, 1)."""
    rng = np.random.default_rng(seed)

    def noisy(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        name = path[-1].key
        value = np.asarray(leaf, np.float32)
        if name in ("kernel", "embedding"):
            scale = 0.5 * float(np.std(value))
        elif name == "gamma_imag":
            scale = 1.0
        else:
            scale = 0.2
        return jnp.asarray(value + scale * rng.standard_normal(value.shape, np.float32))

    return jax.tree_util.tree_map_with_path(noisy, params)


@functools.cache
def build(case: str) -> Pair:
    cfg = base_config(**CASES[case])
    model = MegalodonLM(cfg)
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    params = perturb(variables["params"], seed=1)
    ours = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    theirs_model = bridge.to_megalodon_jax(params, cfg)
    theirs = eqx.filter_jit(lambda m, t: m(t)[0])
    return Pair(cfg, params, ours, theirs_model, theirs)


def tokens(cfg: MegalodonConfig, length: int, seed: int) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (BATCH, length), 0, cfg.vocab_size)


def assert_logits_close(ours: jax.Array, theirs: jax.Array) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
    assert np.all(np.isfinite(ours))
    # Non-degenerate logits: the comparison would be weak if they were near-constant.
    assert np.std(theirs) > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- mapping
@pytest.mark.parametrize("case", list(CASES))
def test_mapping_is_complete(case: str) -> None:
    """Every Flax leaf maps to exactly one megalodon-jax parameter and every one is set."""
    pair = build(case)
    ours_flat = jax.tree_util.tree_leaves_with_path(pair.params)
    tensors = bridge.megalodon_jax_tensors(pair.params, pair.cfg)  # raises on leftovers
    assert len(tensors) == len(ours_flat)

    skeleton = bridge.skeleton(pair.cfg)
    expected = model_state_dict(skeleton)  # megalodon-jax's own parameter enumeration
    assert set(tensors) == set(expected)
    assert not bridge.is_fully_set(skeleton)

    loaded = pair.theirs_model
    assert bridge.is_fully_set(loaded)
    their_arrays = jax.tree.leaves(eqx.filter(loaded, eqx.is_array))
    assert len(their_arrays) == len(tensors)
    their_state = model_state_dict(loaded)
    for name, value in tensors.items():
        assert their_state[name].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(their_state[name]), value, err_msg=name)
        assert np.ptp(value) > 0, f"{name} was not perturbed"

    ours_count = sum(int(np.size(leaf)) for _, leaf in ours_flat)
    their_count = bridge.megalodon_jax_config(pair.cfg).parameter_count_breakdown()["total"]
    assert ours_count == their_count == sum(int(np.size(a)) for a in their_arrays)


def test_mapping_rejects_hf_topology() -> None:
    cfg = base_config(bias_topology="hf")
    with pytest.raises(ValueError, match="bias_topology"):
        bridge.megalodon_jax_config(cfg)


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_logits_one_chunk(case: str) -> None:
    pair = build(case)
    toks = tokens(pair.cfg, ONE_CHUNK, seed=2)
    assert_logits_close(pair.ours(pair.params, toks), pair.theirs(pair.theirs_model, toks))


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_logits_multi_chunk(case: str) -> None:
    pair = build(case)
    toks = tokens(pair.cfg, 3 * pair.cfg.chunk_size + 5, seed=3)
    assert_logits_close(pair.ours(pair.params, toks), pair.theirs(pair.theirs_model, toks))


# ----------------------------------------------------------------------------- streaming
def _split(toks: jax.Array, sizes: tuple[int, ...]) -> list[jax.Array]:
    assert sum(sizes) == toks.shape[1]
    bounds = np.cumsum((0, *sizes))
    return [toks[:, a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.slow
def test_streaming_matches_megalodon_jax_cache() -> None:
    """Our cached calls vs megalodon-jax's cache API (different splits) and its one-shot
    logits; the final caches hold the same state.

    Our split (5, 1, 33, 14) covers a prefill into a fresh cache, a single-token decode, a
    call longer than 2C crossing two chunk boundaries (L >= 32: FFT path with initial
    state) and a call ending inside a chunk; megalodon-jax's split is (16, 37).
    """
    pair = build("swiglu_untied")
    cfg = pair.cfg
    c = cfg.chunk_size
    toks = tokens(cfg, 3 * c + 5, seed=4)
    model = MegalodonLM(cfg)

    step = jax.jit(lambda p, t, cache: model.apply({"params": p}, t, cache=cache))
    cache = init_cache(cfg, BATCH)
    ours_parts = []
    for piece in _split(toks, (5, 1, 33, 14)):
        logits, cache = step(pair.params, piece, cache)
        ours_parts.append(logits)
    ours = jnp.concatenate(ours_parts, axis=1)

    their_step = eqx.filter_jit(lambda m, t, cache: m(t, cache=cache, return_cache=True))
    their_cache = mjax.init_cache(bridge.megalodon_jax_config(cfg))
    their_parts = []
    for piece in _split(toks, (16, 37)):
        logits, their_cache = their_step(pair.theirs_model, piece, their_cache)
        their_parts.append(logits)
    theirs = jnp.concatenate(their_parts, axis=1)

    assert_logits_close(ours, theirs)
    assert_logits_close(ours, pair.theirs(pair.theirs_model, toks))

    total = toks.shape[1]
    live = total % c  # ring slots 0..live-1 hold the current chunk's tokens
    for mine, their in zip(cache.layers, their_cache.layer_caches, strict=True):
        assert int(mine.position) == int(their.attn.count) == total
        np.testing.assert_array_equal(mine.norm.count, their.norm.count)
        np.testing.assert_allclose(mine.norm.mean, their.norm.mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mine.norm.var, their.norm.var, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mine.cema, their.ema.h, rtol=1e-5, atol=1e-5)
        my_keys, my_values = ring_entries(mine.attn, toks.shape[0])
        np.testing.assert_allclose(my_keys[:, :live], their.attn.k[:, :live], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            my_values[:, :live], their.attn.v[:, :live], rtol=1e-5, atol=1e-5
        )
    final, their_final = cache.final_norm, their_cache.final_norm
    np.testing.assert_array_equal(final.count, their_final.count)
    np.testing.assert_allclose(final.mean, their_final.mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.var, their_final.var, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_greedy_generate_agrees_with_our_logits() -> None:
    """Each token megalodon-jax's greedy `generate` emits is an argmax of our logits."""
    pair = build("swiglu_untied")
    plen, new = 5, ONE_CHUNK + 1 - 5  # our check then reuses the one-chunk compilation
    prompt = tokens(pair.cfg, plen, seed=5)
    out, _, _ = mjax.generate(pair.theirs_model, prompt, new, temperature=0.0)
    out = np.asarray(out)
    assert out.shape == (BATCH, plen + new)
    np.testing.assert_array_equal(out[:, :plen], np.asarray(prompt))
    logits = np.asarray(pair.ours(pair.params, jnp.asarray(out[:, :-1])))
    for pos in range(plen - 1, plen - 1 + new):
        chosen = np.take_along_axis(logits[:, pos], out[:, pos + 1, None], axis=-1)[:, 0]
        np.testing.assert_array_less(logits[:, pos].max(axis=-1) - chosen, ATOL)
