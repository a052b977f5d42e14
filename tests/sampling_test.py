"""Tests of jitted generation and sampling (megalodon_flax.sampling).

Oracles: the uncached full forward over the growing sequence (a second code path), float64
NumPy implementations of the sampling filters, per-row generation for batching, and an
unconstrained run for the stop token.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax import sampling
from megalodon_flax.megalodon.cache import init_cache
from megalodon_flax.megalodon.model import MegalodonLM
from megalodon_flax.sampling import filter_logits, generate, lower_generate, sample_logits
from tests.factories import tiny_megalodon_config

# Module-wide (so the module fixtures compile under the same setting as the tests).
pytestmark = pytest.mark.usefixtures("highest_precision")

PROMPT_LEN = 10
NEW_TOKENS = 64

# An untied model 64 wide with 4 heads and chunks of 16 (generation crosses chunk boundaries).
tiny_config = functools.partial(
    tiny_megalodon_config,
    model_dim=64,
    num_heads=4,
    z_dim=64,
    value_dim=64,
    ffn_hidden_dim=128,
    chunk_size=16,
    tie_policy="explicit",
    share_emb=False,
)


@pytest.fixture(scope="module")
def lm():
    """Tiny untied model with every parameter perturbed away from its (often zero) init."""
    model = MegalodonLM(tiny_config())

    def init(key):
        boxed = model.init(key, jnp.zeros((1, 4), jnp.int32))["params"]
        leaves, treedef = jax.tree.flatten(nn.unbox(boxed))
        keys = jax.random.split(jax.random.key(1), len(leaves))
        leaves = [
            p + 0.3 * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, leaves), boxed

    params, boxed = jax.jit(init)(jax.random.key(0))
    return model, params, boxed


def prompts(batch: int, length: int, seed: int = 2) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 64, jnp.int32)


def forward(model, params, tokens) -> np.ndarray:
    logits, _ = jax.jit(model.apply)({"params": params}, tokens)
    return np.asarray(logits)


# Programs shared between tests (compilation dominates the runtime of this file).
@pytest.fixture(scope="module")
def greedy_run(lm):
    """Greedy (B=2, P=10, T=64) run: prompt, tokens and the returned cache."""
    model, params, _ = lm
    prompt = prompts(2, PROMPT_LEN)
    tokens, cache = generate(
        model, params, prompt, NEW_TOKENS, jax.random.key(3), 0.0, return_cache=True
    )
    return prompt, np.asarray(tokens), cache


SAMPLING = dict(temperature=1.0, top_k=20, min_p=0.01)


@pytest.fixture(scope="module")
def sampled_run(lm):
    """Sampled (B=4, P=10, T=40) run with key 21."""
    model, params, _ = lm
    prompt = prompts(4, PROMPT_LEN, seed=12)
    tokens = generate(model, params, prompt, 40, jax.random.key(21), **SAMPLING)
    return prompt, np.asarray(tokens)


# ---------------------------------------------------------------------------- greedy == oracle
def test_greedy_matches_uncached_forward_across_chunk_boundaries(lm, greedy_run):
    model, params, _ = lm
    prompt, out, _ = greedy_run
    assert out.shape == (2, NEW_TOKENS) and out.dtype == np.int32
    assert len(np.unique(out)) >= 8, "degenerate generation would make this test weak"

    seq = jnp.concatenate([prompt, jnp.asarray(out)], axis=1)
    # One uncached forward over prompt + generated tokens: logits at position t only see
    # tokens <= t, so its argmax at P-1+i is the greedy choice for new token i.
    full = forward(model, params, seq[:, :-1])
    np.testing.assert_array_equal(full[:, PROMPT_LEN - 1 :].argmax(-1), out)
    # A literal growing-sequence check: the first query of the second chunk.
    logits = forward(model, params, seq[:, :17])
    np.testing.assert_array_equal(logits[:, -1].argmax(-1), out[:, 17 - PROMPT_LEN])


def test_top_k_one_equals_greedy(lm, greedy_run):
    model, params, _ = lm
    prompt, greedy, _ = greedy_run
    for temperature, key in ((1.0, 1), (0.5, 2)):
        sampled = generate(
            model, params, prompt, NEW_TOKENS, jax.random.key(key), temperature, top_k=1
        )
        np.testing.assert_array_equal(sampled, greedy)


def test_batch_rows_equal_single_prompt_generation(lm, greedy_run):
    model, params, _ = lm
    prompt, batched, _ = greedy_run
    for i in range(2):
        alone = generate(model, params, prompt[i : i + 1], NEW_TOKENS, jax.random.key(0), 0.0)
        np.testing.assert_array_equal(alone, batched[i : i + 1])


def test_boxed_params_and_variables_dict_accepted(lm, greedy_run):
    model, params, boxed = lm
    prompt, want, _ = greedy_run
    # A {'params': ...} variables dict of the perturbed parameters reproduces greedy_run.
    np.testing.assert_array_equal(
        generate(model, {"params": params}, prompt, NEW_TOKENS, jax.random.key(0), 0.0), want
    )
    # Boxed (logically partitioned) init parameters equal their unboxed copy.
    unboxed = generate(model, nn.unbox(boxed), prompt, NEW_TOKENS, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(
        generate(model, boxed, prompt, NEW_TOKENS, jax.random.key(0), 0.0), unboxed
    )


# ---------------------------------------------------------------------------- compilation
def test_same_shapes_do_not_retrace(lm, monkeypatch):
    model, params, _ = lm
    traces = []
    real_sample = sampling._sample

    def counting_sample(*args, **kwargs):
        traces.append(1)  # runs only while the core is being traced
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sampling, "_sample", counting_sample)
    core = sampling._generate_core
    kwargs = dict(temperature=0.7, top_p=0.9)
    generate(model, params, prompts(1, 5, seed=1), 3, jax.random.key(0), **kwargs)
    per_trace = len(traces)
    # Earlier tests of the session may hold this program already: count from here.
    size1 = core._cache_size()
    assert per_trace > 0 and size1 >= 1
    # New values (prompt, key, temperature, top_p), an equal model object and fresh
    # parameter arrays: same program.
    params2 = jax.tree.map(lambda p: p * 1.0, params)
    for seed in range(3):
        generate(
            MegalodonLM(tiny_config()),
            params2,
            prompts(1, 5, seed=10 + seed),
            3,
            jax.random.key(seed),
            temperature=0.5 + seed,
            top_p=0.5 + 0.1 * seed,
        )
    assert len(traces) == per_trace and core._cache_size() == size1
    # A new shape compiles exactly once more.
    generate(model, params, prompts(1, 5, seed=1), 4, jax.random.key(0), **kwargs)
    generate(model, params, prompts(1, 5, seed=2), 4, jax.random.key(1), **kwargs)
    assert len(traces) == 2 * per_trace


# ---------------------------------------------------------------------------- constant memory
def test_decode_state_has_fixed_shape(lm):
    model, params, _ = lm
    prompt = prompts(2, PROMPT_LEN, seed=9)
    fresh = jax.eval_shape(lambda: init_cache(model.config, 2))

    def shapes(steps: int):
        return jax.eval_shape(
            lambda p: generate(model, params, p, steps, jax.random.key(0), 0.0, return_cache=True),
            prompt,
        )

    results = [shapes(n) for n in (1, 40, 4000)]
    for _, cache in results:
        assert jax.tree.structure(cache) == jax.tree.structure(fresh)
        same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), cache, fresh)
        assert all(jax.tree.leaves(same))
    assert [r[0].shape for r in results] == [(2, 1), (2, 40), (2, 4000)]


def test_compiled_memory_does_not_grow_with_new_tokens(lm, greedy_run):
    model, params, _ = lm
    prompt = greedy_run[0]

    def stats(steps: int):
        lowered = lower_generate(model, params, prompt, steps, jax.random.key(0), 0.0)
        return lowered.compile().memory_analysis()

    short, long = stats(NEW_TOKENS), stats(2048)  # the first is the greedy_run program
    assert abs(long.temp_size_in_bytes - short.temp_size_in_bytes) <= (
        0.05 * short.temp_size_in_bytes
    )
    # Outputs are the tokens and the fixed-size cache: only the (B, T) int32 tokens grow.
    grown = long.output_size_in_bytes - short.output_size_in_bytes
    assert grown == prompt.shape[0] * (2048 - NEW_TOKENS) * 4


def test_returned_cache_equals_one_shot_prefill(lm, greedy_run):
    model, params, _ = lm
    prompt, tokens, cache = greedy_run
    seq = jnp.concatenate([prompt, jnp.asarray(tokens[:, :-1])], axis=1)
    _, want = jax.jit(model.apply)({"params": params}, seq, cache=init_cache(model.config, 2))
    assert int(cache.position) == PROMPT_LEN + NEW_TOKENS - 1 == int(want.position)
    for got_leaf, want_leaf in zip(jax.tree.leaves(cache), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-4, atol=1e-5
        )


# ---------------------------------------------------------------------------- stop token
def test_stop_token_freezes_finished_rows(lm, sampled_run):
    model, params, _ = lm
    prompt, free = sampled_run
    # Pick the stop token that occurs early (before step 35) in the most rows, not all.
    best, best_rows = None, 0
    for v in np.unique(free):
        early = (free[:, :35] == v).any(axis=1)
        if best_rows < early.sum() < len(free):
            best, best_rows = int(v), int(early.sum())
    assert best is not None
    stopped = np.asarray(
        generate(model, params, prompt, 40, jax.random.key(21), **SAMPLING, stop_token=best)
    )
    for row_free, row_stop in zip(free, stopped, strict=True):
        hits = np.flatnonzero(row_free == best)
        if hits.size == 0:
            np.testing.assert_array_equal(row_stop, row_free)
        else:
            first = hits[0]
            np.testing.assert_array_equal(row_stop[: first + 1], row_free[: first + 1])
            assert (row_stop[first:] == best).all()
    assert (stopped != free).any()


# ---------------------------------------------------------------------------- determinism
def test_generation_is_deterministic_given_the_key(lm, sampled_run):
    model, params, _ = lm
    prompt, first = sampled_run
    again = generate(model, params, prompt, 40, jax.random.key(21), **SAMPLING)
    np.testing.assert_array_equal(again, first)
    other = np.asarray(generate(model, params, prompt, 40, jax.random.key(22), **SAMPLING))
    assert (other != first).any()


# ---------------------------------------------------------------------------- sampling oracle
def oracle_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Float64 filtered distribution for one row of logits, token by token."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if 0 < top_k < z.size:
        kth = np.sort(z)[::-1][top_k - 1]
        keep &= z >= kth

    def softmax(mask):
        e = np.where(mask, np.exp(z - z[mask].max()), 0.0)
        return e / e.sum()

    if top_p < 1.0:
        p = softmax(keep)
        keep &= np.array([p[p > p[i]].sum() < top_p for i in range(z.size)])
    if min_p > 0.0:
        p = softmax(keep)
        keep &= p >= min_p * p.max()
    return softmax(keep)


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.06),
    dict(temperature=2.0, top_k=100, top_p=0.5),
    dict(temperature=0.5, top_p=0.95, min_p=0.02),
]


def _well_posed(row: np.ndarray, s: dict) -> bool:
    """No token within 1e-4 of a top-p or min-p decision boundary."""
    z = row.astype(np.float64) / s["temperature"]
    k = s.get("top_k", 0)
    if 0 < k < z.size:
        z = np.where(z >= np.sort(z)[::-1][k - 1], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    before = np.array([p[p > x].sum() for x in p])
    ok = np.all(np.abs(before - s.get("top_p", 1.0)) > 1e-4) or s.get("top_p", 1.0) == 1.0
    mp = s.get("min_p", 0.0)
    return ok and (mp == 0.0 or np.all(np.abs(p - mp * p.max()) > 1e-4 * p.max()))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: str(s))
def test_filter_logits_matches_numpy_oracle(setting):
    logits = np.asarray(jax.random.normal(jax.random.key(30), (6, 50)) * 2.0)
    assert all(_well_posed(row, setting) for row in logits)
    got = np.asarray(jax.nn.softmax(filter_logits(logits, **setting), axis=-1))
    for row, got_row in zip(logits, got, strict=True):
        want = oracle_probs(row, **setting)
        np.testing.assert_array_equal(got_row > 0, want > 0)
        np.testing.assert_allclose(got_row, want, atol=1e-6, rtol=1e-5)


def test_filters_keep_ties_at_the_boundary():
    logits = np.array([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]], np.float32)
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2)))[0]
    np.testing.assert_array_equal(kept, [1, 1, 1, 1, 0, 0])
    # Probabilities ∝ (e^3, e^2, e^2, e^2, e, 1): the mass above each e^2 token is ~0.47.
    p = oracle_probs(logits[0], 1.0)
    assert p[0] < 0.5 < p[0] + p[1]
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.5)))[0]
    np.testing.assert_array_equal(kept, [1, 1, 1, 1, 0, 0])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=p[0] - 1e-3)))[0]
    np.testing.assert_array_equal(kept, [1, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("setting", SETTINGS[1:5], ids=lambda s: str(s))
def test_sample_logits_empirical_distribution(setting):
    row = np.asarray(jax.random.normal(jax.random.key(31), (12,)) * 1.5)
    want = oracle_probs(row, **setting)
    n = 40_000
    samples = np.asarray(sample_logits(np.tile(row, (n, 1)), jax.random.key(32), **setting))
    assert samples.shape == (n,) and samples.dtype == np.int32
    counts = np.bincount(samples, minlength=row.size)
    assert np.all(counts[want == 0] == 0)
    freq = counts / n
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-9), (freq, want)


def test_sample_logits_greedy_and_determinism():
    logits = np.asarray(jax.random.normal(jax.random.key(33), (8, 20)))
    np.testing.assert_array_equal(
        sample_logits(logits, jax.random.key(0), temperature=0.0), logits.argmax(-1)
    )
    a = sample_logits(logits, jax.random.key(1))
    np.testing.assert_array_equal(a, sample_logits(logits, jax.random.key(1)))
    many = sample_logits(np.tile(logits[:1], (64, 1)), jax.random.key(2))
    assert len(np.unique(np.asarray(many))) > 1  # rows draw independently
    raw = sample_logits(logits, jax.random.PRNGKey(1))  # legacy uint32 keys work too
    np.testing.assert_array_equal(raw, sample_logits(logits, jax.random.PRNGKey(1)))


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(min_p=1.0), ValueError, "min_p"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(prompt_tokens=np.zeros((2, 0), np.int32)), ValueError, "empty"),
        (dict(prompt_tokens=np.zeros((2, 3), np.float32)), TypeError, "integers"),
        (dict(prompt_tokens=np.zeros((3,), np.int32)), ValueError, r"\(B, P\)"),
        (dict(prompt_tokens=np.full((1, 3), 64, np.int32)), ValueError, "token ids"),
        (dict(stop_token=64), ValueError, "stop_token"),
        (dict(rng=np.zeros((2, 2), np.uint32)), TypeError, "rng"),
    ],
)
def test_invalid_arguments_raise_clear_errors(lm, kwargs, error, match):
    model, params, _ = lm
    args = dict(prompt_tokens=np.zeros((1, 3), np.int32), max_new_tokens=2, rng=jax.random.key(0))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        generate(model, params, **args)


def test_weights_cast_before_decoding_give_identical_logits(lm) -> None:
    """generate() casts matmul weights to the compute dtype once; the layers would cast them
    on every call, so the logits are bit-identical (bf16 compute, fp32 storage)."""
    model, params, _ = lm
    bf16 = MegalodonLM(model.config.replace(compute_dtype="bfloat16"))
    cast = sampling._matmul_weights_in_compute_dtype(params, bf16.config)
    kinds = {path[-1].key: leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(cast)}
    assert kinds["kernel"] == jnp.bfloat16 and kinds["alpha"] == jnp.float32
    tokens = jax.random.randint(jax.random.key(7), (2, 40), 0, 64)
    ref, ref_cache = bf16.apply({"params": params}, tokens, return_cache=True)
    out, out_cache = bf16.apply({"params": cast}, tokens, return_cache=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    step_ref, _ = bf16.apply({"params": params}, tokens[:, :1], cache=ref_cache)
    step_out, _ = bf16.apply({"params": cast}, tokens[:, :1], cache=out_cache)
    np.testing.assert_array_equal(np.asarray(step_out), np.asarray(step_ref))
    fp32 = sampling._matmul_weights_in_compute_dtype(params, model.config)
    assert all(a is b for a, b in zip(jax.tree.leaves(fp32), jax.tree.leaves(params), strict=True))
