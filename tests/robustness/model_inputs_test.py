"""Input checks of the model API (issue 13, root cause 9): token ids, masks, caches, generate.

Oracles:
* `testdata/model_inputs_golden.npz`: logits and generated tokens the code computed before
  these checks existed (`golden_cases()` below, run with `--write` at that revision), for
  valid inputs of both families: plain, right-padded, streamed, jitted, prefill + step,
  greedy and sampled generation. Valid inputs must still give them.
* For an out-of-range id under jit (documented: it embeds as zeros, its own logits are NaN):
  the same model with one extra vocabulary row set to zero, fed that row's id.
* For the wide head (output_size > vocab_size): logits forced to favour the ids beyond the
  vocabulary, brute force over seeds; the first generated token equals `sample_logits` on
  the first vocab_size logits of the prefill.
* For every refused input: the error type, one line, and the words naming the cause.
"""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax import llama, megalodon
from megalodon_flax.llama import LlamaConfig, LlamaLM
from megalodon_flax.megalodon import MegalodonLM
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.sampling import generate, sample_logits

GOLDEN = Path(__file__).parent / "testdata" / "model_inputs_golden.npz"
MEG = MegalodonConfig(
    vocab_size=32,
    model_dim=16,
    num_layers=1,
    num_heads=2,
    z_dim=8,
    value_dim=16,
    ffn_hidden_dim=32,
    cema_ndim=2,
    chunk_size=8,
    norm_num_groups=2,
)
WIDE = MEG.replace(output_size=40)  # untied head wider than the vocabulary
LLAMA = LlamaConfig(vocab_size=32, model_dim=16, num_layers=1, num_heads=2, ffn_hidden_dim=32)
CONFIGS = {"meg": MEG, "wide": WIDE, "llama": LLAMA}
LENGTHS = (12, 7)  # valid tokens per row of the right-padded mask
# Generation with the wide head changed on purpose (it used to emit ids >= vocab_size).
CHANGED = frozenset({"wide_greedy", "wide_sample"})


def model_of(config):
    return LlamaLM(config) if isinstance(config, LlamaConfig) else MegalodonLM(config)


def cache_of(config, batch: int = 2, capacity: int = 12):
    if isinstance(config, LlamaConfig):
        return llama.init_cache(config, batch, capacity)
    return megalodon.init_cache(config, batch)


def params_of(model) -> dict:
    """Initial parameters, every leaf perturbed (no exact zeros or ones)."""
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def golden_tokens() -> np.ndarray:
    return np.array(jax.random.randint(jax.random.key(2), (2, 12), 0, 32), np.int32)


def golden_mask() -> np.ndarray:
    return np.arange(12)[None, :] < np.asarray(LENGTHS)[:, None]


def golden_cases(skip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """The valid-input outputs the golden file holds (see the module docstring), but the
    generations named in `skip`."""
    out = {}
    tokens, mask = golden_tokens(), golden_mask()
    for name, config in CONFIGS.items():
        model = model_of(config)
        variables = {"params": params_of(model)}
        out[f"{name}_full"] = model.apply(variables, tokens)[0]
        out[f"{name}_mask"] = model.apply(variables, tokens, attention_mask=mask)[0]
        cache = cache_of(config)
        parts = []
        for piece in np.split(tokens, [5, 6], axis=1):
            logits, cache = model.apply(variables, piece, cache=cache)
            parts.append(logits)
        out[f"{name}_stream"] = jnp.concatenate(parts, axis=1)
        out[f"{name}_jit"] = jax.jit(lambda v, t, m=model: m.apply(v, t)[0])(variables, tokens)
        if name != "llama":
            _, cache = model.apply(variables, tokens, return_cache=True)
            out[f"{name}_prefill_step"] = model.apply(variables, tokens[:, :1], cache=cache)[0]
        params, prompt = variables["params"], tokens[:, :4]
        if f"{name}_greedy" not in skip:
            out[f"{name}_greedy"] = generate(model, params, prompt, 6, jax.random.key(3), 0.0)
        if f"{name}_sample" not in skip:
            out[f"{name}_sample"] = generate(model, params, prompt, 6, jax.random.key(4), top_k=5)
    return {k: np.asarray(v) for k, v in out.items()}


_PARAMS: dict[str, dict] = {}


def params_for(name: str) -> dict:
    if name not in _PARAMS:
        _PARAMS[name] = params_of(model_of(CONFIGS[name]))
    return _PARAMS[name]


def one_line_error(excinfo: pytest.ExceptionInfo, *words: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


# ---------------------------------------------------------------------------- valid inputs
def test_valid_inputs_give_the_outputs_of_the_code_before_the_checks() -> None:
    """The checks only add selects that keep valid values unchanged: token ids bit for bit,
    logits to float32 rounding (the file was written before TimestepNorm's statistics moved
    to blocked prefix sums, which changes the last bits, not the function)."""
    expected = dict(np.load(GOLDEN))
    got = golden_cases(skip=CHANGED)
    assert set(got) == set(expected) - CHANGED
    for key in sorted(got):
        if np.issubdtype(expected[key].dtype, np.floating):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # The oracle has teeth: the old wide-head generation emitted ids beyond the vocabulary
    # (now refused: see the wide-head test below).
    assert expected["wide_sample"].max() >= MEG.vocab_size


@pytest.mark.parametrize("name", ["meg", "llama"])
@pytest.mark.parametrize(
    "mask",
    [
        np.ones((2, 12), np.int32),
        np.ones((2, 12), np.float32),
        np.zeros((2, 12), bool),  # rows of padding only are right padding too
        golden_mask().astype(np.int64),
        golden_mask().astype(np.float32),
        golden_mask().astype(np.uint8),
    ],
    ids=["int-ones", "float-ones", "all-padding", "int64", "float", "uint8"],
)
def test_valid_masks_of_any_0_1_dtype_are_accepted(name, mask) -> None:
    model, params = model_of(CONFIGS[name]), params_for(name)
    tokens = golden_tokens()
    logits, _ = model.apply({"params": params}, tokens, attention_mask=mask)
    as_bool, _ = model.apply({"params": params}, tokens, attention_mask=mask.astype(bool))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(as_bool))
    assert np.isfinite(np.asarray(logits)).all()


# ---------------------------------------------------------------------------- token ids
@pytest.mark.parametrize("name", ["meg", "llama"])
@pytest.mark.parametrize(
    ("bad", "where"),
    [(32, (0, 0)), (40, (1, 6)), (2**31 - 1, (0, 11)), (-1, (1, 3)), (-32, (0, 5))],
)
def test_out_of_range_ids_are_refused_with_the_range(name, bad, where) -> None:
    model, params = model_of(CONFIGS[name]), params_for(name)
    tokens = golden_tokens()
    tokens[where] = bad
    for kwargs in (dict(), dict(cache=cache_of(CONFIGS[name])), dict(attention_mask=None)):
        with pytest.raises(ValueError) as excinfo:
            model.apply({"params": params}, jnp.asarray(tokens), **kwargs)
        low, high = int(tokens.min()), int(tokens.max())
        one_line_error(
            excinfo,
            "token ids must lie in [0, 32)",
            "vocab_size = 32",
            f"got ids in [{low}, {high}]",
            f"the first {bad} at (row {where[0]}, position {where[1]})",
        )
    # generate's prompt check is the same rule, with the argument's name.
    with pytest.raises(ValueError) as excinfo:
        generate(model, params, tokens, 2, jax.random.key(0))
    one_line_error(excinfo, "prompt_tokens: token ids must lie in [0, 32)", str(bad))


@pytest.mark.parametrize("name", ["meg", "llama"])
def test_ids_of_other_dtypes_and_shapes(name) -> None:
    model, params = model_of(CONFIGS[name]), params_for(name)
    tokens = golden_tokens()
    # uint8 ids are checked like any integer ids.
    ok, _ = model.apply({"params": params}, tokens.astype(np.uint8))
    np.testing.assert_allclose(np.asarray(ok), np.load(GOLDEN)[f"{name}_full"], atol=1e-6)
    with pytest.raises(ValueError, match=r"got ids in \[\d+, 255\]"):
        model.apply({"params": params}, np.full((2, 3), 255, np.uint8))
    for wrong in (tokens.astype(np.float32), tokens[0], tokens[:, :0]):
        with pytest.raises(ValueError) as excinfo:
            model.apply({"params": params}, wrong)
        one_line_error(excinfo, "tokens must")


@pytest.mark.parametrize("name", ["meg", "llama"])
@pytest.mark.parametrize("bad", [32, 1000, -1])
def test_out_of_range_ids_under_jit_poison_only_their_own_position(name, bad) -> None:
    """Traced ids cannot raise: an out-of-range id embeds as zeros and its own logits are
    NaN. Oracle: a model with a 33rd, all-zero embedding row, fed id 32 there."""
    config = CONFIGS[name]
    model, params = model_of(config), params_for(name)
    tokens = golden_tokens()
    bad_at = [(0, 6), (1, 0), (1, 11)]
    for r, c in bad_at:
        tokens[r, c] = bad
    logits = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, tokens))
    is_bad = np.zeros(tokens.shape, bool)
    for where in bad_at:
        is_bad[where] = True
    assert np.isnan(logits[is_bad]).all()
    assert np.isfinite(logits[~is_bad]).all()

    big = config.replace(vocab_size=33)
    embed_path = ("embedding",) if name == "llama" else ("model", "embed", "embedding")
    big_params = jax.tree.map(lambda x: x, params)
    holder = big_params
    for key in embed_path[:-1]:
        holder[key] = dict(holder[key])
        holder = holder[key]
    holder[embed_path[-1]] = jnp.concatenate(
        [holder[embed_path[-1]], jnp.zeros((1, config.model_dim))], axis=0
    )
    zero_row = np.where(is_bad, 32, tokens)
    expected, _ = model_of(big).apply({"params": big_params}, zero_row)
    expected = np.asarray(expected)[..., :32]
    np.testing.assert_allclose(logits[~is_bad], expected[~is_bad], atol=2e-5, rtol=0)
    # Earlier positions do not see the bad id at all: they equal the clean run.
    clean = np.load(GOLDEN)[f"{name}_jit"]
    np.testing.assert_allclose(logits[0, :6], clean[0, :6], atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------- masks
LEFT = np.arange(12)[None, :] >= np.asarray([0, 5])[:, None]  # row 1 left-padded
HOLE = np.ones((2, 12), bool)
HOLE[0, 4] = False  # a hole: padding, then valid tokens again
LATE = np.zeros((2, 12), bool)
LATE[1, 11] = True  # only the last token valid


@pytest.mark.parametrize("name", ["meg", "llama"])
@pytest.mark.parametrize(
    ("mask", "words"),
    [
        (LEFT, ("only right padding is supported", "row 1 has padding at position 4")),
        (HOLE, ("only right padding is supported", "row 0 has padding at position 4")),
        (LATE, ("only right padding is supported", "row 1 has padding at position 10")),
        (LEFT.astype(np.int32), ("only right padding", "valid token at position 5")),
        (np.full((2, 12), 2, np.int32), ("only 0/1", "(row 0, position 0)")),
        (np.full((2, 12), 0.5, np.float32), ("only 0/1", "0.5")),
        (np.where(golden_mask(), 1, -1), ("only 0/1", "-1")),
        (np.full((2, 12), np.nan, np.float32), ("only 0/1", "nan")),
        (np.ones((2, 12), np.complex64), ("must be bool", "complex64")),
        (np.ones((2, 11), bool), ("attention_mask shape (2, 11) != tokens shape (2, 12)",)),
    ],
)
def test_masks_that_are_not_right_padding_or_not_0_1_are_refused(name, mask, words) -> None:
    model, params = model_of(CONFIGS[name]), params_for(name)
    with pytest.raises(ValueError) as excinfo:
        model.apply({"params": params}, golden_tokens(), attention_mask=mask)
    one_line_error(excinfo, *words)


@pytest.mark.parametrize("name", ["meg", "llama"])
@pytest.mark.parametrize("mask", [LEFT, HOLE, np.where(golden_mask(), 1.0, 0.5)])
def test_invalid_masks_under_jit_give_nan_rows(name, mask) -> None:
    """Traced masks cannot raise: a row that is not 0/1 right padding has NaN logits; a
    valid row gives what it gives alone."""
    model, params = model_of(CONFIGS[name]), params_for(name)
    valid_mask = golden_mask()
    right_padded = [
        bool(np.isin(m, (0, 1)).all() and (np.diff(m.astype(np.float32)) <= 0).all()) for m in mask
    ]
    bad_rows = [r for r in range(2) if not right_padded[r]]
    assert bad_rows
    mixed = np.where(np.isin(np.arange(2), bad_rows)[:, None], mask, valid_mask)
    apply = jax.jit(lambda p, t, m: model.apply({"params": p}, t, attention_mask=m)[0])
    logits = np.asarray(apply(params, golden_tokens(), mixed.astype(np.float32)))
    reference = np.load(GOLDEN)[f"{name}_mask"]
    for row in range(2):
        if row in bad_rows:
            assert np.isnan(logits[row]).all()
        else:
            np.testing.assert_allclose(logits[row], reference[row], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- caches
def _meg_cache(**changes):
    return megalodon.init_cache(MEG.replace(**changes), 2)


def _retyped(cache, path: str, dtype):
    leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
    treedef = jax.tree.structure(cache)
    return jax.tree.unflatten(
        treedef,
        [
            leaf.astype(dtype) if jax.tree_util.keystr(p).endswith(path) else leaf
            for p, leaf in leaves
        ],
    )


MEG_BAD_CACHES = {
    "layers": (lambda: _meg_cache(num_layers=2), ("cache has 2 layers", "num_layers = 1")),
    "batch": (lambda: megalodon.init_cache(MEG, 3), ("batch size 3", "batch size 2")),
    "chunk": (
        lambda: _meg_cache(chunk_size=4),
        ("cache.layers[0].attn.keys has shape (4, 4, 4)", "expected (4, 4, 8)", "chunk_size"),
    ),
    "z_dim": (lambda: _meg_cache(z_dim=16), ("attn.keys", "z_dim/num_heads")),
    "heads": (lambda: _meg_cache(num_heads=1), ("attn.keys has shape (2, 8, 8)",)),
    "model_dim": (
        lambda: _meg_cache(model_dim=32, value_dim=32, ffn_hidden_dim=32),
        ("cache.layers[0].cema has shape (2, 32, 2)", "(B, model_dim, cema_ndim)"),
    ),
    "cema_ndim": (lambda: _meg_cache(cema_ndim=4), ("cema has shape (2, 16, 4)",)),
    "groups": (lambda: _meg_cache(norm_num_groups=4), ("norm.mean", "norm_num_groups")),
    "value_dim": (lambda: _meg_cache(value_dim=32), ("attn.values", "value_dim/num_heads")),
    "int_keys": (
        lambda: _retyped(megalodon.init_cache(MEG, 2), "attn.keys", jnp.int32),
        ("attn.keys has dtype int32", "floating"),
    ),
    "real_cema": (
        lambda: _retyped(megalodon.init_cache(MEG, 2), ".cema", jnp.float32),
        ("cema has dtype float32", "complex"),
    ),
    "float_position": (
        lambda: _retyped(megalodon.init_cache(MEG, 2), "position", jnp.float32),
        ("position has dtype float32", "integer"),
    ),
    "llama_cache": (
        lambda: llama.init_cache(LLAMA, 2, 12),
        ("must be a Megalodon ModelCache", "LlamaCache belongs to LlamaLM"),
    ),
    "dict": (lambda: {"layers": ()}, ("must be a Megalodon ModelCache, got a dict",)),
}
LLAMA_BAD_CACHES = {
    "megalodon_cache": (
        lambda: megalodon.init_cache(MEG, 2),
        ("must be a LlamaCache", "ModelCache belongs to MegalodonLM"),
    ),
    "layers": (
        lambda: llama.init_cache(LLAMA.replace(num_layers=3), 2, 12),
        ("cache has 3 layers", "num_layers = 1"),
    ),
    "batch": (lambda: llama.init_cache(LLAMA, 1, 12), ("batch size 1", "batch size 2")),
    "heads": (
        lambda: llama.init_cache(LLAMA.replace(num_heads=4), 2, 12),
        ("keys has shape (2, 12, 4, 4)", "expected (2, 12, 2, 8)", "num_heads"),
    ),
    "model_dim": (
        lambda: llama.init_cache(LLAMA.replace(model_dim=32), 2, 12),
        ("keys has shape (2, 12, 2, 16)", "model_dim/num_heads"),
    ),
    "rank": (
        lambda: llama.LlamaCache(
            tuple(
                llama.LayerKV(k.keys[0], k.values[0]) for k in llama.init_cache(LLAMA, 2, 12).layers
            ),
            jnp.zeros((), jnp.int32),
        ),
        ("keys has shape (12, 2, 8)",),
    ),
    "int_values": (
        lambda: _retyped(llama.init_cache(LLAMA, 2, 12), "values", jnp.int32),
        ("values has dtype int32", "floating"),
    ),
    "length_shape": (
        lambda: llama.init_cache(LLAMA, 2, 12).replace(length=jnp.zeros((2,), jnp.int32)),
        ("cache.length has shape (2,)", "expected ()"),
    ),
    "overflow": (
        lambda: llama.init_cache(LLAMA, 2, 12).replace(length=jnp.asarray(8, jnp.int32)),
        ("holds 8 of its 12 positions", "5 more tokens do not fit", "larger capacity"),
    ),
}


@pytest.mark.parametrize("case", sorted(MEG_BAD_CACHES))
def test_megalodon_refuses_a_cache_of_another_config_batch_or_family(case) -> None:
    make, words = MEG_BAD_CACHES[case]
    model, params = MegalodonLM(MEG), params_for("meg")
    tokens = golden_tokens()[:, :5]
    with pytest.raises(ValueError) as excinfo:
        model.apply({"params": params}, tokens, cache=make())
    one_line_error(excinfo, *words, "init_cache(config, batch_size)")
    # Shapes only: the same error under jit.
    with pytest.raises(ValueError) as excinfo:
        jax.jit(lambda c: model.apply({"params": params}, tokens, cache=c)[0])(make())
    one_line_error(excinfo, *words)


@pytest.mark.parametrize("case", sorted(LLAMA_BAD_CACHES))
def test_llama_refuses_a_cache_of_another_config_batch_or_family(case) -> None:
    make, words = LLAMA_BAD_CACHES[case]
    model, params = LlamaLM(LLAMA), params_for("llama")
    tokens = golden_tokens()[:, :5]
    with pytest.raises(ValueError) as excinfo:
        model.apply({"params": params}, tokens, cache=make())
    one_line_error(excinfo, *words)
    if case == "overflow":  # a value: under jit the call's logits are NaN instead
        logits = jax.jit(lambda c: model.apply({"params": params}, tokens, cache=c)[0])(make())
        assert np.isnan(np.asarray(logits)).all()
        return
    with pytest.raises(ValueError) as excinfo:
        jax.jit(lambda c: model.apply({"params": params}, tokens, cache=c)[0])(make())
    one_line_error(excinfo, *words)


def test_caches_of_another_float_dtype_still_work() -> None:
    """The checks compare dtype kinds: a bfloat16 ring in a float32 model is accepted, and
    a cache whose layers are a list streams like the tuple one."""
    model, params = MegalodonLM(MEG), params_for("meg")
    tokens = golden_tokens()
    logits, _ = model.apply(
        {"params": params}, tokens[:, :5], cache=megalodon.init_cache(MEG, 2, jnp.bfloat16)
    )
    assert np.isfinite(np.asarray(logits)).all()
    cache = megalodon.init_cache(MEG, 2)
    listed = cache.replace(layers=list(cache.layers))
    a, _ = model.apply({"params": params}, tokens[:, :5], cache=listed)
    b, _ = model.apply({"params": params}, tokens[:, :5], cache=cache)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------- generation
def _favouring_out_of_vocab(params: dict) -> dict:
    """Head columns 0..31 zero (in-vocab logits all 0), 32..39 scaled up: the raw argmax
    and nearly all the softmax mass lie beyond the vocabulary."""
    kernel = params["lm_head"]["kernel"]  # (D, 40)
    kernel = jnp.concatenate([jnp.zeros_like(kernel[:, :32]), 200.0 * kernel[:, 32:]], axis=1)
    return {**params, "lm_head": {**params["lm_head"], "kernel": kernel}}


def test_a_head_wider_than_the_vocabulary_never_feeds_back_an_out_of_vocab_id() -> None:
    model = MegalodonLM(WIDE)
    params = _favouring_out_of_vocab(params_for("wide"))
    prompt = golden_tokens()[:, :4]
    raw, _ = model.apply({"params": params}, prompt)
    raw = np.asarray(raw)[:, -1]
    assert (raw.argmax(-1) >= 32).all()  # unrestricted, greedy would pick beyond the vocab
    seen = set()
    for seed in range(40):
        rng = jax.random.key(seed)
        tokens = np.asarray(generate(model, params, prompt, 5, rng, temperature=1.0))
        assert tokens.min() >= 0 and tokens.max() < 32, (seed, tokens)
        seen.update(tokens.ravel().tolist())
        # Oracle for the first token: sample_logits over the first vocab_size logits.
        first = sample_logits(raw[:, :32], jax.random.split(rng, 5)[0], temperature=1.0)
        np.testing.assert_array_equal(tokens[:, 0], np.asarray(first))
    assert len(seen) > 16  # in-vocab logits are all 0: the draws spread over the vocabulary
    for kwargs in (dict(temperature=0.0), dict(top_k=3), dict(top_p=0.5), dict(min_p=0.1)):
        tokens = np.asarray(generate(model, params, prompt, 5, jax.random.key(1), **kwargs))
        assert tokens.max() < 32, kwargs
    with pytest.raises(ValueError, match=r"stop_token must be None or an int in \[0, 32\)"):
        generate(model, params, prompt, 2, jax.random.key(0), stop_token=35)


@pytest.mark.parametrize("name", ["meg", "llama"])
def test_generate_continues_a_checked_stream(name) -> None:
    """generate's decode passes the model's cache checks under its jit (golden outputs are
    checked above); its returned cache is accepted by a further cached call."""
    model, params = model_of(CONFIGS[name]), params_for(name)
    prompt = golden_tokens()[:, :4]
    tokens, cache = generate(model, params, prompt, 4, jax.random.key(5), return_cache=True)
    if name == "llama":  # capacity P + T = 8, and 7 positions are filled
        logits, _ = model.apply({"params": params}, tokens[:, -1:], cache=cache)
        with pytest.raises(ValueError, match="do not fit"):
            model.apply({"params": params}, tokens[:, -2:], cache=cache)
    else:
        logits, _ = model.apply({"params": params}, tokens[:, -1:], cache=cache)
    assert np.isfinite(np.asarray(logits)).all()


if __name__ == "__main__" and "--write" in sys.argv:
    np.savez(GOLDEN, **golden_cases())
