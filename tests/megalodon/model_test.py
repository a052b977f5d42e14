"""End-to-end tests of the Megalodon LM (spec §10 items 21-25 and 28, heads, CEMA paths;
dtypes, remat and attention kernels: compute_options_test.py).

Oracles: the one-shot uncached forward as the reference for every streaming partition, a
float64 NumPy TimestepNorm (`tests/reference/timestep_norm.py`) + head for the two-hop
identity, shorter unpadded runs for padding and prefixes, float64 NumPy statistics for the
initializers.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.megalodon import MegalodonLM, ModelCache, init_cache
from megalodon_flax.megalodon.chunked_attention import ring_entries
from megalodon_flax.megalodon.config import MegalodonConfig
from tests.factories import tiny_megalodon_config
from tests.megalodon.tiny_model import (
    BATCH,
    LENGTH,
    TINY,
    abstract,
    jitted_apply,
    param_shapes,
    random_params,
    reference_logits,
    tokens_for,
)
from tests.reference import timestep_norm as reference_timestep_norm

pytestmark = pytest.mark.usefixtures("highest_precision")


# ----------------------------------------------------------------------------- helpers
def stream(
    cfg: MegalodonConfig, variables: dict, tokens: jax.Array, sizes: list[int]
) -> tuple[np.ndarray, list[ModelCache]]:
    """Feeds `tokens` in consecutive calls of the given sizes; returns logits and caches."""
    assert sum(sizes) == tokens.shape[1]
    apply = jitted_apply(cfg)
    cache = init_cache(cfg, tokens.shape[0])
    outputs, caches, start = [], [], 0
    for size in sizes:
        logits, cache = apply(variables, tokens[:, start : start + size], cache=cache)
        outputs.append(np.asarray(logits))
        caches.append(cache)
        start += size
    return np.concatenate(outputs, axis=1), caches


def assert_caches_close(actual: ModelCache, expected: ModelCache, atol: float = 1e-5) -> None:
    """Counts and positions exact; moments, CEMA states and KV rings within atol."""
    assert int(actual.position) == int(expected.position)
    pairs = [*zip(actual.layers, expected.layers, strict=True)]
    for got, want in pairs:
        assert int(got.position) == int(want.position)
        np.testing.assert_array_equal(np.asarray(got.norm.count), np.asarray(want.norm.count))
        for field in ("mean", "var"):
            np.testing.assert_allclose(
                np.asarray(getattr(got.norm, field)),
                np.asarray(getattr(want.norm, field)),
                atol=atol,
                rtol=atol,
            )
        np.testing.assert_allclose(
            np.asarray(got.cema), np.asarray(want.cema), atol=atol, rtol=atol
        )
        for field in ("keys", "values"):
            np.testing.assert_allclose(
                np.asarray(getattr(got.attn, field)),
                np.asarray(getattr(want.attn, field)),
                atol=atol,
                rtol=atol,
            )
    np.testing.assert_array_equal(
        np.asarray(actual.final_norm.count), np.asarray(expected.final_norm.count)
    )
    for field in ("mean", "var"):
        np.testing.assert_allclose(
            np.asarray(getattr(actual.final_norm, field)),
            np.asarray(getattr(expected.final_norm, field)),
            atol=atol,
            rtol=atol,
        )


# ----------------------------------------------------------------------------- item 21
STREAM_PARTITIONS = {
    "prefill13_then_single": [13] + [1] * (LENGTH - 13),
    "calls_3_5_8_1_7_16": [3, 5, 8, 1, 7, 16],
    "one_token_at_a_time": [1] * LENGTH,
    "long_prefill_then_short": [35, 5],
    "short_then_long": [5, 35],
}
REFERENCE_PARTITION = "long_prefill_then_short"


@functools.cache
def streamed(name: str) -> tuple[np.ndarray, tuple[ModelCache, ...]]:
    logits, caches = stream(TINY, random_params(TINY), tokens_for(TINY), STREAM_PARTITIONS[name])
    return logits, tuple(caches)


@pytest.mark.parametrize("name", list(STREAM_PARTITIONS))
def test_streaming_matches_one_shot(name: str) -> None:
    """Any partition of the stream reproduces the uncached logits: single tokens and short
    calls (< 32, sequential CEMA), chunk-crossing calls, a long prefill (L ≥ 32 > C, FFT CEMA
    with closed-form state) and a long call continuing a non-empty state."""
    logits, caches = streamed(name)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference_logits(TINY), atol=1e-4, rtol=1e-4)
    final = caches[-1]
    assert int(final.position) == LENGTH
    for layer in final.layers:
        np.testing.assert_array_equal(np.asarray(layer.norm.count), LENGTH)
        # 40 is a multiple of C = 8: the ring holds the finished chunk (times 32-39), and
        # the next token attends to none of it (checked by the partitions that go on).
        keys, values = ring_entries(layer.attn, BATCH)
        assert np.all(np.any(np.asarray(keys) != 0, axis=(2, 3)))
        assert np.all(np.any(np.asarray(values) != 0, axis=(2, 3)))
    np.testing.assert_array_equal(np.asarray(final.final_norm.count), LENGTH)


@pytest.mark.parametrize("name", [n for n in STREAM_PARTITIONS if n != REFERENCE_PARTITION])
def test_final_caches_agree_across_partitions(name: str) -> None:
    """Final caches agree across partitions: counts exact, moments and states 1e-5."""
    assert_caches_close(streamed(name)[1][-1], streamed(REFERENCE_PARTITION)[1][-1])


def test_intermediate_caches_agree() -> None:
    """After 13 tokens (prefill vs 13 single steps) every field agrees, including the KV
    ring, whose slots 0-4 hold times 8-12 and slots 5-7 the finished chunk's times 5-7."""
    prefill = streamed("prefill13_then_single")[1][0]
    single_steps = streamed("one_token_at_a_time")[1]
    single = single_steps[12]
    assert int(prefill.position) == 13
    assert_caches_close(single, prefill)
    ring = np.asarray(ring_entries(prefill.layers[0].attn, BATCH)[0])
    assert np.all(np.any(ring != 0, axis=(2, 3)))  # slots 0-4: times 8-12; 5-7: times 5-7
    # Slots 5-7 still hold times 5-7 of the finished first chunk, as written after 8 tokens.
    after_eight = np.asarray(ring_entries(single_steps[7].layers[0].attn, BATCH)[0])
    np.testing.assert_allclose(ring[:, 5:], after_eight[:, 5:], rtol=1e-5, atol=1e-5)


def test_cache_round_trips_through_jit() -> None:
    """The cache is a pytree of fixed structure: returned caches keep init_cache's tree,
    shapes, dtypes and weak types (no recompilation per step) and pass through jit intact."""
    fresh = init_cache(TINY, BATCH)
    after = streamed("calls_3_5_8_1_7_16")[1][2]
    assert jax.tree.structure(after) == jax.tree.structure(fresh)
    assert abstract(after) == abstract(fresh)
    echoed = jax.jit(lambda c: c)(after)
    assert isinstance(echoed, ModelCache)
    for got, want in zip(jax.tree.leaves(echoed), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    leaves, treedef = jax.tree.flatten(after)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert int(rebuilt.position) == 16


@pytest.mark.parametrize("prefill", [13, 35])
def test_fresh_prefill_with_return_cache(prefill: int) -> None:
    """`return_cache=True` without a cache (vectorized pristine prefill) gives the logits of the
    uncached call and the cache that prefilling from `init_cache` gives; decoding on from it
    reproduces the one-shot logits."""
    variables = random_params(TINY)
    tokens = tokens_for(TINY)
    apply = jax.jit(MegalodonLM(TINY).apply, static_argnames="return_cache")
    logits, cache = apply(variables, tokens[:, :prefill], return_cache=True)
    _, expected = stream(TINY, variables, tokens[:, :prefill], [prefill])
    assert_caches_close(cache, expected[-1])
    assert abstract(cache) == abstract(init_cache(TINY, BATCH))
    outputs = [np.asarray(logits)]
    for t in range(prefill, LENGTH):
        step, cache = apply(variables, tokens[:, t : t + 1], cache=cache)
        outputs.append(np.asarray(step))
    np.testing.assert_allclose(
        np.concatenate(outputs, axis=1), reference_logits(TINY), atol=1e-4, rtol=1e-4
    )


# ----------------------------------------------------------------------------- items 22-24
@pytest.mark.parametrize("changed", [0, 17, LENGTH - 1])
def test_causality(changed: int) -> None:
    """Changing token t leaves logits at positions < t unchanged (1e-5) and changes t."""
    tokens = tokens_for(TINY)
    edited = tokens.at[:, changed].set((tokens[:, changed] + 7) % TINY.vocab_size)
    logits, _ = jitted_apply(TINY)(random_params(TINY), edited)
    logits = np.asarray(logits)
    reference = reference_logits(TINY)
    np.testing.assert_allclose(logits[:, :changed], reference[:, :changed], atol=1e-5, rtol=0)
    assert np.max(np.abs(logits[:, changed] - reference[:, changed])) > 1e-3


@functools.cache
def prefix_logits(length: int) -> np.ndarray:
    logits, _ = jitted_apply(TINY)(random_params(TINY), tokens_for(TINY)[:, :length])
    return np.asarray(logits)


@pytest.mark.parametrize("length", [7, 8, 9, 16, 22])
def test_chunk_boundary_lengths_equal_prefixes(length: int) -> None:
    """L ∈ {C−1, C, C+1, 2C, 3C−2} runs and equals the prefix of the length-40 run."""
    logits = prefix_logits(length)
    assert logits.shape == (BATCH, length, TINY.vocab_size)
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits, reference_logits(TINY)[:, :length], atol=1e-5, rtol=1e-5)


def test_right_padding_matches_shorter_sequences() -> None:
    """With the last tokens of each row masked, valid logits equal the unpadded shorter run
    (1e-5), whatever the padded token ids are, and every output is finite."""
    valid = (22, 16)
    mask = np.zeros((BATCH, LENGTH), bool)
    for row, n in enumerate(valid):
        mask[row, :n] = True
    tokens = tokens_for(TINY)
    garbage = jnp.where(mask, tokens, (tokens * 5 + 3) % TINY.vocab_size)
    apply = jitted_apply(TINY)
    params = random_params(TINY)
    logits, cache = apply(params, tokens, attention_mask=jnp.asarray(mask))
    logits_garbage, _ = apply(params, garbage, attention_mask=jnp.asarray(mask))
    assert cache is None
    logits, logits_garbage = np.asarray(logits), np.asarray(logits_garbage)
    assert np.all(np.isfinite(logits))
    for row, n in enumerate(valid):
        np.testing.assert_allclose(logits[row, :n], prefix_logits(n)[row], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(logits_garbage[row, :n], logits[row, :n], atol=1e-6, rtol=0)


def test_mask_with_cache_is_rejected() -> None:
    tokens = tokens_for(TINY, length=3)
    with pytest.raises(ValueError, match="attention_mask"):
        MegalodonLM(TINY).apply(
            random_params(TINY),
            tokens,
            cache=init_cache(TINY, BATCH),
            attention_mask=jnp.ones(tokens.shape, bool),
        )


# ----------------------------------------------------------------------------- item 25 + heads
@functools.cache
def captured_forward(cfg: MegalodonConfig):
    """Jitted forward returning logits and the captured per-module outputs."""

    def run(variables: dict, tokens: jax.Array) -> tuple[jax.Array, dict]:
        (logits, _), state = MegalodonLM(cfg).apply(
            variables, tokens, capture_intermediates=True, mutable=["intermediates"]
        )
        return logits, state["intermediates"]

    return jax.jit(run)


def test_two_hop_residual_identity() -> None:
    """fc2 weight and bias zero ⇒ every block is the identity (bit-exact), so the logits are
    head(final_norm(embeddings)) from a NumPy oracle, whatever the attention weights."""
    params = random_params(TINY, seed=5)
    inner = dict(params["params"]["model"])
    for i in range(TINY.num_layers):
        layer = dict(inner[f"layers_{i}"])
        ffn = dict(layer["ffn"])
        ffn["fc2"] = jax.tree.map(jnp.zeros_like, ffn["fc2"])
        layer["ffn"] = ffn
        inner[f"layers_{i}"] = layer
    variables = {"params": {**params["params"], "model": inner}}
    tokens = tokens_for(TINY, seed=6)
    logits, inter = captured_forward(TINY)(variables, tokens)
    embedded = np.asarray(inter["model"]["embed"]["__call__"][0])
    for i in range(TINY.num_layers):
        out, _ = inter["model"][f"layers_{i}"]["__call__"][0]
        np.testing.assert_array_equal(np.asarray(out), embedded)
    table = np.asarray(inner["embed"]["embedding"], np.float64)
    np.testing.assert_array_equal(embedded, table[np.asarray(tokens)].astype(np.float32))
    hidden, *_ = reference_timestep_norm.brute_force(
        table[np.asarray(tokens)],
        np.asarray(inner["norm"]["weight"]),
        np.asarray(inner["norm"]["bias"]),
        TINY.norm_num_groups,
        TINY.norm_eps,
    )
    np.testing.assert_allclose(np.asarray(logits), hidden @ table.T, atol=1e-5, rtol=1e-5)
    # With the original fc2 the blocks are not the identity.
    _, inter_full = captured_forward(TINY)(params, tokens)
    out_full, _ = inter_full["model"]["layers_0"]["__call__"][0]
    assert np.max(np.abs(np.asarray(out_full) - embedded)) > 1e-3


@pytest.mark.parametrize(
    ("overrides", "tied", "width"),
    [
        ({}, True, 64),
        ({"output_size": 80}, False, 80),
        ({"output_size": 64}, True, 64),
        ({"tie_policy": "explicit"}, False, 64),
        ({"tie_policy": "explicit", "share_emb": True}, True, 64),
        ({"share_emb": True}, True, 64),
    ],
)
def test_head_tying_structure(overrides: dict, tied: bool, width: int) -> None:
    """tie_policy 'hf' ties iff V_out == V (share_emb ignored); 'explicit' ties iff share_emb."""
    cfg = TINY.replace(**overrides)
    assert cfg.tied is tied
    shapes = param_shapes(cfg)["params"]
    if tied:
        assert "lm_head" not in shapes
    else:
        assert shapes["lm_head"]["kernel"].shape == (cfg.model_dim, width)
        assert set(shapes["lm_head"]) == {"kernel"}  # no bias


@pytest.mark.parametrize("overrides", [{}, {"output_size": 80}])
def test_head_logits(overrides: dict) -> None:
    """Logits = final hidden · W_outᵀ with W_out the embedding (tied) or the head kernel."""
    cfg = TINY.replace(**overrides)
    params = random_params(cfg, seed=8)
    logits, inter = captured_forward(cfg)(params, tokens_for(cfg))
    hidden, _ = inter["model"]["__call__"][0]
    hidden = np.asarray(hidden, np.float64)
    if cfg.tied:
        weight = np.asarray(params["params"]["model"]["embed"]["embedding"], np.float64).T
    else:
        weight = np.asarray(params["params"]["lm_head"]["kernel"], np.float64)
    assert logits.dtype == jnp.float32
    assert logits.shape == (BATCH, LENGTH, cfg.output_width)
    np.testing.assert_allclose(np.asarray(logits), hidden @ weight, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- CEMA paths
@pytest.mark.parametrize("path", ["scan", "sequential"])
def test_cema_paths_give_same_logits(path: str) -> None:
    """cema_path 'scan' / 'sequential' reproduce the FFT model (1e-4)."""
    cfg = TINY.replace(cema_path=path)
    logits, _ = jitted_apply(cfg)(random_params(cfg), tokens_for(cfg))
    np.testing.assert_allclose(np.asarray(logits), reference_logits(TINY), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- item 28
INIT_CONFIG = tiny_megalodon_config(
    vocab_size=4096,
    model_dim=256,
    z_dim=128,
    value_dim=512,
    ffn_hidden_dim=1024,
    chunk_size=16,
    norm_num_groups=8,
    swiglu=True,
    rescale_nffn=True,
    tie_policy="explicit",
)


@functools.cache
def initialized() -> dict:
    model = MegalodonLM(INIT_CONFIG)
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(lambda key: nn.unbox(model.init(key, tokens)))(jax.random.PRNGKey(28))
    return jax.tree.map(np.asarray, params)["params"]


def test_init_statistics() -> None:
    """he kernels std 1/sqrt(3·fan_in) (2%); embedding and untied head std 0.9866/sqrt(D)
    (2%) with max ≤ 3/sqrt(D); biases, norms, Q/K affine and gamma_imag zero; omega in
    [−1, 1]; sigmoid(theta) a permutation of D^(−k/D); FFN rescale 0.1·0.5^i."""
    params = initialized()
    dim = INIT_CONFIG.model_dim
    for table in (params["model"]["embed"]["embedding"], params["lm_head"]["kernel"]):
        table = np.asarray(table, np.float64)
        assert abs(table.std() / (0.9866 / math.sqrt(dim)) - 1) < 0.02
        assert np.max(np.abs(table)) <= 3 / math.sqrt(dim) * (1 + 1e-6)
        assert abs(table.mean()) < 0.01 / math.sqrt(dim)
    fan_ins = {
        "wz": dim,
        "wv": dim,
        "wr": dim,
        "wh1": dim,
        "wh2": INIT_CONFIG.value_dim,
        "fc1": dim,
        "fc3": dim,
        "fc2": INIT_CONFIG.ffn_hidden_dim,
    }
    expected_theta = np.sort(dim ** (-np.arange(1, dim + 1) / dim))
    thetas = []
    for i in range(INIT_CONFIG.num_layers):
        layer = params["model"][f"layers_{i}"]
        blocks = {**layer["attn"], **layer["ffn"]}
        for name, fan_in in fan_ins.items():
            kernel = np.asarray(blocks[name]["kernel"], np.float64)
            assert kernel.shape[0] == fan_in
            assert abs(kernel.std() / (1 / math.sqrt(3 * fan_in)) - 1) < 0.02, name
            np.testing.assert_array_equal(blocks[name]["bias"], 0.0)
        for norm in (layer["attn"]["timenorm"], layer["ffn"]["norm"]):
            np.testing.assert_array_equal(norm["weight"], 0.0)
            np.testing.assert_array_equal(norm["bias"], 0.0)
        np.testing.assert_array_equal(layer["attn"]["rmsnorm"]["gamma"], 0.0)
        np.testing.assert_array_equal(layer["attn"]["gamma"], 0.0)
        np.testing.assert_array_equal(layer["attn"]["beta"], 0.0)
        np.testing.assert_allclose(layer["ffn"]["alpha"], 0.1 * 0.5**i, rtol=1e-7)
        cema = layer["attn"]["cema"]
        np.testing.assert_array_equal(cema["gamma_imag"], 0.0)
        assert abs(np.std(cema["gamma_real"]) - 1) < 0.1
        assert abs(np.std(cema["alpha"]) / 0.2 - 1) < 0.1
        assert abs(np.std(cema["delta"]) / 0.2 - 1) < 0.1
        omega = np.asarray(cema["omega"])
        assert np.all(np.abs(omega) <= 1) and 0.15 < omega.std() < 0.3
        theta = np.asarray(cema["theta"], np.float64).ravel()
        np.testing.assert_allclose(np.sort(1 / (1 + np.exp(-theta))), expected_theta, rtol=1e-5)
        thetas.append(theta)
    assert not np.array_equal(thetas[0], thetas[1])  # a random permutation per layer
    np.testing.assert_array_equal(params["model"]["norm"]["weight"], 0.0)
    np.testing.assert_array_equal(params["model"]["norm"]["bias"], 0.0)
