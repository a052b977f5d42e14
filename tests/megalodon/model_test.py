"""End-to-end tests of the Megalodon LM (spec §10 items 21-25 and 28-30, heads, CEMA paths).

Oracles: the one-shot uncached forward as the reference for every streaming partition, a
float64 NumPy TimestepNorm (`tests/reference/timestep_norm.py`) + head for the two-hop
identity, shorter unpadded runs for padding and prefixes, float64 NumPy statistics for the
initializers, the float32 model for the bfloat16 policy and the plain model for
rematerialization.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.config_base import ConfigError
from megalodon_flax.megalodon import MegalodonLM, ModelCache, init_cache, layer_stack
from megalodon_flax.megalodon.chunked_attention import ring_entries
from megalodon_flax.megalodon.config import MegalodonConfig
from tests.factories import tiny_megalodon_config
from tests.reference import losses
from tests.reference import timestep_norm as reference_timestep_norm

pytestmark = pytest.mark.usefixtures("highest_precision")

TINY = tiny_megalodon_config(
    model_dim=64, num_heads=4, z_dim=64, value_dim=64, ffn_hidden_dim=128, swiglu=True
)
BATCH = 2
LENGTH = 40


# ----------------------------------------------------------------------------- helpers
def _path_names(path: tuple) -> list[str]:
    return [str(getattr(p, "key", p)) for p in path]


@functools.cache
def param_shapes(cfg: MegalodonConfig) -> dict:
    """Abstract parameter tree (shapes and dtypes) of `MegalodonLM(cfg)`."""
    model = MegalodonLM(cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), tokens)))


@functools.cache
def random_params(cfg: MegalodonConfig, seed: int = 0) -> dict:
    """Parameters drawn per spec §6 with every path exercised: gamma_imag ~ N(0,1) and
    nonzero biases, norm affines and Q/K gamma/beta. Drawn in NumPy, stored in each leaf's
    dtype."""
    rng = np.random.default_rng(seed)
    dim = cfg.model_dim

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        names = _path_names(path)
        name, parent = names[-1], names[-2]
        shape = leaf.shape
        if name == "embedding" or parent == "lm_head":
            value = np.clip(rng.standard_normal(shape), -3, 3) / math.sqrt(dim)
        elif name == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(3 * shape[0])
        elif parent == "cema" and name in ("alpha", "delta"):
            value = 0.2 * rng.standard_normal(shape)
        elif parent == "cema" and name == "theta":
            freqs = dim ** (-np.arange(1, dim + 1) / dim)
            freqs = np.clip(rng.permutation(freqs), 1e-6, 1 - 1e-6)
            value = np.log(freqs / (1 - freqs)).reshape(shape)
        elif parent == "cema" and name in ("gamma_real", "gamma_imag"):
            value = rng.standard_normal(shape)
        elif parent == "cema" and name == "omega":
            value = np.clip(0.25 * rng.standard_normal(shape), -1, 1)
        elif name == "alpha":  # FFN rescale
            layer = int(names[-3].split("_")[-1])
            value = 0.1 * 0.5**layer * (1 + 0.1 * rng.standard_normal(shape))
        else:  # biases, norm scales/offsets, Q/K gamma/beta
            value = 0.1 * rng.standard_normal(shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


@functools.cache
def jitted_apply(cfg: MegalodonConfig):
    return jax.jit(MegalodonLM(cfg).apply)


def tokens_for(cfg: MegalodonConfig, length: int = LENGTH, seed: int = 1) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, cfg.vocab_size, size=(BATCH, length)), jnp.int32)


@functools.cache
def reference_logits(cfg: MegalodonConfig, seed: int = 0) -> np.ndarray:
    """One-shot uncached logits of the length-40 token batch."""
    logits, cache = jitted_apply(cfg)(random_params(cfg, seed), tokens_for(cfg))
    assert cache is None
    return np.asarray(logits)


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


def _abstract(tree: object) -> object:
    return jax.tree.map(lambda a: (a.shape, a.dtype, bool(getattr(a, "weak_type", False))), tree)


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
    assert _abstract(after) == _abstract(fresh)
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
    assert _abstract(cache) == _abstract(init_cache(TINY, BATCH))
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


# ----------------------------------------------------------------------------- item 29
def _sensitive(names: list[str]) -> bool:
    if names[-2] == "cema" or names[-1] in ("gamma", "beta", "alpha"):
        return True
    return names[-2] in ("timenorm", "rmsnorm", "norm")


def test_param_dtype_policy() -> None:
    """param_dtype='bfloat16' stores ordinary kernels/biases/embedding as bf16 and the
    sensitive set (CEMA, every norm, Q/K gamma/beta, FFN alpha) as fp32."""
    cfg = TINY.replace(
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        rescale_nffn=True,
        tie_policy="explicit",
    )
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    seen = {"sensitive": 0, "ordinary": 0}
    for path, leaf in flat:
        names = _path_names(path)
        if _sensitive(names):
            assert leaf.dtype == jnp.float32, names
            seen["sensitive"] += 1
        else:
            assert leaf.dtype == jnp.bfloat16, names
            seen["ordinary"] += 1
    assert seen["sensitive"] > 0 and seen["ordinary"] > 0
    # bf16 compute with fp32 storage keeps every parameter fp32.
    fp32_storage = param_shapes(TINY.replace(compute_dtype="bfloat16"))
    assert {leaf.dtype for leaf in jax.tree.leaves(fp32_storage)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_compute_loss_close_to_fp32() -> None:
    """bf16 compute: fp32 logits and a loss within 1e-2 relative of the fp32 model."""
    cfg = TINY.replace(compute_dtype="bfloat16")
    tokens = tokens_for(TINY)
    logits, _ = jitted_apply(cfg)(random_params(TINY), tokens)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    loss16 = losses.next_token_loss(np.asarray(logits), tokens)
    loss32 = losses.next_token_loss(reference_logits(TINY), tokens)
    assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)
    # bf16 compute is really used: logits differ from fp32 beyond fp32 rounding.
    assert np.max(np.abs(np.asarray(logits) - reference_logits(TINY))) > 1e-4


def test_bfloat16_streaming_state_dtypes() -> None:
    """bf16 storage and compute in a cached call: CEMA state complex64, TimestepNorm moments
    fp32, counts int32, KV ring bf16, logits fp32 with a loss within 1e-2 of fp32."""
    cfg = TINY.replace(compute_dtype="bfloat16", param_dtype="bfloat16")
    shapes = param_shapes(cfg)
    params = jax.tree.map(lambda p, s: p.astype(s.dtype), random_params(TINY), shapes)
    tokens = tokens_for(TINY)[:, :13]
    fresh = init_cache(cfg, BATCH)
    logits, cache = jitted_apply(cfg)(params, tokens, cache=fresh)
    assert logits.dtype == jnp.float32
    assert _abstract(cache) == _abstract(fresh)
    for layer in cache.layers:
        assert layer.cema.dtype == jnp.complex64
        assert layer.norm.mean.dtype == jnp.float32 and layer.norm.var.dtype == jnp.float32
        assert layer.norm.count.dtype == jnp.int32
        assert layer.attn.keys.dtype == jnp.bfloat16
        assert layer.attn.values.dtype == jnp.bfloat16
    assert cache.final_norm.mean.dtype == jnp.float32
    assert cache.final_norm.var.dtype == jnp.float32
    loss = losses.next_token_loss(np.asarray(logits), tokens)
    loss32 = losses.next_token_loss(reference_logits(TINY)[:, :13], tokens)
    assert abs(loss - loss32) <= 1e-2 * abs(loss32)


def test_float16_is_refused() -> None:
    """float16 is rejected by the config and when float16 parameters reach apply."""
    for field in ("param_dtype", "compute_dtype"):
        with pytest.raises(ConfigError, match=field):
            TINY.replace(**{field: "float16"})
    params16 = jax.tree.map(lambda p: p.astype(jnp.float16), random_params(TINY))
    with pytest.raises(ValueError, match="float16"):
        MegalodonLM(TINY).apply(params16, tokens_for(TINY, length=4))


# ----------------------------------------------------------------------------- item 30
def _loss_fn(cfg: MegalodonConfig):
    model = MegalodonLM(cfg)

    def loss(params: dict, tokens: jax.Array) -> jax.Array:
        logits, _ = model.apply(params, tokens)
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
        return -jnp.mean(picked)

    return jax.jit(jax.value_and_grad(loss))


@functools.cache
def _plain_loss_and_grads():
    return _loss_fn(TINY)(random_params(TINY, seed=30), tokens_for(TINY, length=16, seed=30))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy", "scan_layers"),
    [
        ("full", False),
        ("save_dots_no_batch", False),
        ("save_dots", True),
        ("save_dots_spectra_probs", True),
    ],
)
def test_remat_gives_identical_loss_and_gradients(policy: str, scan_layers: bool) -> None:
    """Every remat policy recomputes (part of) the blocks in the backward pass, unrolled or
    scanned: the loss and gradients of the plain unrolled model (1e-6)."""
    params = random_params(TINY, seed=30)
    tokens = tokens_for(TINY, length=16, seed=30)
    loss, grads = _plain_loss_and_grads()
    cfg = TINY.replace(remat_policy=policy, scan_layers=scan_layers)
    loss_r, grads_r = _loss_fn(cfg)(layer_stack.to_layout(params, scan_layers), tokens)
    grads_r = layer_stack.to_layout(grads_r, scan_layers=False)
    np.testing.assert_allclose(float(loss_r), float(loss), atol=1e-6, rtol=1e-6)
    assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
    for got, want in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
    # Gradients reach every parameter (including CEMA and Q/K affine).
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


def test_dot_product_attention_kernel_gives_the_xla_loss_and_gradients() -> None:
    """`attention_impl='dot_product'` (jax.nn.dot_product_attention, chunks folded into the
    batch; Dv = 16 ≠ Dh = 8 here) gives the xla kernel's loss and gradients (1e-5, fp32)."""
    cfg = TINY.replace(value_dim=64, z_dim=32, attention_impl="xla")
    params = random_params(cfg, seed=31)
    tokens = tokens_for(cfg, length=3 * cfg.chunk_size + 5, seed=31)
    loss, grads = _loss_fn(cfg)(params, tokens)
    loss_d, grads_d = _loss_fn(cfg.replace(attention_impl="dot_product"))(params, tokens)
    np.testing.assert_allclose(float(loss_d), float(loss), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads_d), jax.tree.leaves(grads), strict=True):
        scale = float(np.max(np.abs(want))) + 1e-12
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0)
