"""Autoregressive generation with the streaming cache, compiled once per shape.

`generate` prefills the prompt in one cached call (the chunked FFT path with state for long
prompts), then decodes one token per step with the cache inside a single compiled program
(`lax.scan` over the new tokens). For `MegalodonLM` the decode state is the fixed-size
`ModelCache`, so memory does not grow with the number of generated tokens; the `LlamaLM`
baseline decodes with a `LlamaCache` KV buffer sized for the prompt and all new tokens
(P + T positions per layer).

Generated ids are fed back as inputs, so `generate` samples only ids the embedding has: the
first min(vocab_size, output width) logits of each step (a head wider than the vocabulary,
`MegalodonConfig.output_size > vocab_size`, has columns no input can take; they are never
drawn). The prompt's ids are checked by the same rule as the models' inputs
(`layers.input_checks.check_token_range`).

Sampling (`sample_logits`, `filter_logits`) works on float32 logits (B, V):

* temperature 0 is greedy argmax (the filters below are then irrelevant);
* otherwise logits are divided by the temperature and restricted, in this order, to
  - top-k: tokens whose logit is at least the k-th largest (ties at the boundary stay),
  - top-p: tokens for which the probability mass of strictly more probable tokens (after
    top-k, renormalized) is below p, i.e. the smallest head of the distribution reaching p,
  - min-p: tokens with probability at least min_p times the largest probability;
  and one token is drawn from the softmax over the kept tokens.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from megalodon_flax import families
from megalodon_flax.families import LanguageModel, decode_cache
from megalodon_flax.layers.input_checks import check_token_range

__all__ = ["filter_logits", "generate", "lower_generate", "sample_logits"]

_REMOVED = -jnp.inf


# ---------------------------------------------------------------------------- validation
def _check_sampling_args(temperature: Any, top_k: Any, top_p: Any, min_p: Any) -> None:
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not np.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min_p must be in [0, 1) (0 = off), got {min_p}")


def _normalized_switches(
    temperature: float, top_k: int, top_p: float, min_p: float, vocab: int
) -> tuple[bool, int, bool, bool]:
    """Static switches (greedy, top_k, use_top_p, use_min_p); top_k >= V means off."""
    greedy = float(temperature) == 0.0
    k = 0 if greedy or int(top_k) >= vocab else int(top_k)
    return greedy, k, (not greedy) and float(top_p) < 1.0, (not greedy) and float(min_p) > 0.0


# ---------------------------------------------------------------------------- sampling
def _filter(
    logits: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    top_k: int,
    use_top_p: bool,
    use_min_p: bool,
) -> jax.Array:
    """Scaled float32 logits (B, V) with removed tokens set to -inf (static switches)."""
    scaled = logits.astype(jnp.float32) / temperature.astype(jnp.float32)
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled >= kth, scaled, _REMOVED)
    if use_top_p:
        probs = jax.nn.softmax(scaled, axis=-1)
        sorted_probs = -jnp.sort(-probs, axis=-1)  # descending
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        # The smallest kept probability; every token at least as probable stays (tie-safe).
        kept = mass_before < top_p.astype(jnp.float32)
        threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(probs >= threshold, scaled, _REMOVED)
    if use_min_p:
        probs = jax.nn.softmax(scaled, axis=-1)
        floor = min_p.astype(jnp.float32) * jnp.max(probs, axis=-1, keepdims=True)
        scaled = jnp.where(probs >= floor, scaled, _REMOVED)
    return scaled


def _sample(
    logits: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    use_min_p: bool,
) -> jax.Array:
    """One token per row (B,) int32 from logits (B, V)."""
    if greedy:
        return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    filtered = _filter(logits, temperature, top_p, min_p, top_k, use_top_p, use_min_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _filter_jit(logits, scalars, top_k, use_top_p, use_min_p):
    temperature, top_p, min_p = scalars
    return _filter(logits, temperature, top_p, min_p, top_k, use_top_p, use_min_p)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _sample_jit(logits, rng, scalars, greedy, top_k, use_top_p, use_min_p):
    temperature, top_p, min_p = scalars
    return _sample(logits, rng, temperature, top_p, min_p, greedy, top_k, use_top_p, use_min_p)


def _as_logits(logits: Any) -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.ndim < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a float array (..., V), got {logits.dtype}{logits.shape}")
    return logits


def filter_logits(
    logits: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> jax.Array:
    """The tempered, filtered logits that `sample_logits` draws from.

    Args:
      logits: (..., V) float.
      temperature: > 0 (greedy decoding has no distribution to filter).
      top_k, top_p, min_p: the filters of the module docstring (0, 1.0, 0.0 = off).

    Returns:
      (..., V) float32: logits / temperature, with removed tokens at -inf.
    """
    _check_sampling_args(temperature, top_k, top_p, min_p)
    if temperature == 0:
        raise ValueError("filter_logits needs temperature > 0 (temperature 0 is argmax)")
    logits = _as_logits(logits)
    _, k, use_top_p, use_min_p = _normalized_switches(
        temperature, top_k, top_p, min_p, logits.shape[-1]
    )
    scalars = tuple(np.float32(v) for v in (temperature, top_p, min_p))
    return _filter_jit(logits, scalars, k, use_top_p, use_min_p)


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> jax.Array:
    """Draws one token per row.

    Args:
      logits: (..., V) float (computed in float32).
      rng: a PRNG key; rows draw independently from it.
      temperature: 0 = greedy argmax, otherwise the softmax temperature.
      top_k: keep the k most likely tokens (0 = off).
      top_p: nucleus mass in (0, 1] (1 = off).
      min_p: keep tokens with p >= min_p · p_max, in [0, 1) (0 = off).

    Returns:
      (...) int32 token ids.
    """
    _check_sampling_args(temperature, top_k, top_p, min_p)
    logits = _as_logits(logits)
    rng = _check_key(rng)
    switches = _normalized_switches(temperature, top_k, top_p, min_p, logits.shape[-1])
    scalars = tuple(np.float32(v) for v in (temperature, top_p, min_p))
    return _sample_jit(logits, rng, scalars, *switches)


# ---------------------------------------------------------------------------- generation
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _generate_core(
    model: LanguageModel,
    max_new_tokens: int,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    use_min_p: bool,
    use_stop: bool,
    params: Any,
    prompt: jax.Array,
    rng: jax.Array,
    scalars: tuple[jax.Array, jax.Array, jax.Array],
    stop_token: jax.Array,
) -> tuple[jax.Array, Any]:
    """Prefill + `lax.scan` decode; returns tokens (B, T) int32 and the final cache."""
    temperature, top_p, min_p = scalars
    batch = prompt.shape[0]
    variables = {"params": _matmul_weights_in_compute_dtype(params, model.config)}

    def freeze(token: jax.Array, finished: jax.Array) -> tuple[jax.Array, jax.Array]:
        if not use_stop:
            return token, finished
        token = jnp.where(finished, stop_token, token)
        return token, finished | (token == stop_token)

    vocab = _sampled_vocabulary(model.config)

    def sample(logits: jax.Array, key: jax.Array) -> jax.Array:
        # Only ids the embedding has are ever fed back (a wider head's extra columns are cut).
        logits = logits[..., :vocab]
        return _sample(logits, key, temperature, top_p, min_p, greedy, top_k, use_top_p, use_min_p)

    keys = jax.random.split(rng, max_new_tokens)
    cache = decode_cache(model, batch, prompt.shape[1] + max_new_tokens)
    logits, cache = model.apply(variables, prompt, cache=cache, return_cache=True)
    first, finished = freeze(sample(logits[:, -1], keys[0]), jnp.zeros((batch,), bool))

    def step(carry, key):
        cache, token, finished = carry
        logits, cache = model.apply(variables, token[:, None], cache=cache)
        token, finished = freeze(sample(logits[:, -1], key), finished)
        return (cache, token, finished), token

    (cache, _, _), rest = jax.lax.scan(step, (cache, first, finished), keys[1:])
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    return tokens, cache


def _matmul_weights_in_compute_dtype(params: Any, config: Any) -> Any:
    """Casts the matmul weights (`kernel`, `embedding` leaves) to the compute dtype once.

    The layers cast them on every call; doing it before the decode loop gives identical
    results and halves the bytes each bfloat16 decode step reads (decoding one token is
    bound by reading the weights). Everything else (CEMA, norms, biases) stays as stored.
    """
    compute = jnp.dtype(config.compute_jnp_dtype)

    def cast(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        name = getattr(path[-1], "key", None)
        if name in ("kernel", "embedding") and jnp.dtype(leaf.dtype).itemsize > compute.itemsize:
            return leaf.astype(compute)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def _params_collection(params: Any) -> Any:
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]  # a full variables dict was passed
    return params


def _check_prompt(prompt_tokens: Any, vocab_size: int) -> jax.Array:
    prompt = prompt_tokens if isinstance(prompt_tokens, jax.Array) else np.asarray(prompt_tokens)
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt_tokens must hold integers, got dtype {prompt.dtype}")
    if prompt.ndim != 2:
        raise ValueError(f"prompt_tokens must have shape (B, P), got {prompt.shape}")
    if prompt.shape[0] == 0:
        raise ValueError("prompt_tokens must hold at least one row (B >= 1)")
    if prompt.shape[1] == 0:
        raise ValueError("prompt_tokens is empty (P = 0); give at least one token")
    check_token_range(prompt, vocab_size, name="prompt_tokens")
    return jnp.asarray(prompt, jnp.int32)


def _sampled_vocabulary(config: Any) -> int:
    """How many ids `generate` samples from: those both the head and the embedding have."""
    return min(config.vocab_size, config.output_width)


def _check_key(rng: Any) -> jax.Array:
    typed = isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if typed and rng.shape == ():
        return rng
    if not typed and getattr(rng, "dtype", None) == jnp.uint32 and np.ndim(rng) == 1:
        return jnp.asarray(rng)
    raise TypeError(
        "rng must be one PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), got "
        f"{getattr(rng, 'dtype', type(rng).__name__)}{getattr(rng, 'shape', '')}"
    )


def _core_arguments(
    model: LanguageModel,
    params: Any,
    prompt_tokens: Any,
    max_new_tokens: Any,
    rng: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    min_p: Any,
    stop_token: Any,
) -> tuple[Any, ...]:
    """Validates the arguments of `generate` and maps them to those of `_generate_core`."""
    families.family_of_model(model)  # TypeError for anything but a family's LM
    cfg = model.config
    vocab = _sampled_vocabulary(cfg)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_sampling_args(temperature, top_k, top_p, min_p)
    if stop_token is not None and (
        isinstance(stop_token, bool)
        or not isinstance(stop_token, numbers.Integral)
        or not 0 <= stop_token < vocab
    ):
        raise ValueError(f"stop_token must be None or an int in [0, {vocab}), got {stop_token!r}")
    prompt = _check_prompt(prompt_tokens, cfg.vocab_size)
    greedy, k, use_top_p, use_min_p = _normalized_switches(temperature, top_k, top_p, min_p, vocab)
    scalars = tuple(np.float32(v) for v in (temperature, top_p, min_p))
    stop = np.int32(0 if stop_token is None else stop_token)
    return (
        model,
        int(max_new_tokens),
        greedy,
        k,
        use_top_p,
        use_min_p,
        stop_token is not None,
        _params_collection(params),
        prompt,
        _check_key(rng),
        scalars,
        stop,
    )


def generate(
    model: LanguageModel,
    params: Any,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop_token: int | None = None,
    return_cache: bool = False,
) -> jax.Array | tuple[jax.Array, Any]:
    """Continues each prompt row by `max_new_tokens` tokens.

    One compiled program per (batch, prompt length, max_new_tokens, sampling switches): the
    switches are greedy (temperature == 0), top_k, and whether top-p, min-p and a stop token
    are used; the values of temperature, top_p, min_p and stop_token are runtime inputs.

    Args:
      model: the `MegalodonLM` (or the `LlamaLM` baseline, whose KV buffer grows with
        P + T), in eval mode: dropout is off.
      params: its 'params' collection, boxed or unboxed (a {'params': ...} dict also works).
      prompt_tokens: (B, P) int token ids in [0, vocab_size) (checked when concrete), P >= 1,
        no padding (rows share the length).
      max_new_tokens: T >= 1.
      rng: PRNG key; step t samples with the t-th key of `jax.random.split(rng, T)`.
      temperature, top_k, top_p, min_p: see `sample_logits`.
      stop_token: once a row emits it, every later output of that row is this token.
      return_cache: also return the cache, which has consumed the prompt and all generated
        tokens except the last (feed `tokens[:, -1:]` to continue the streams).

    Returns:
      (B, T) int32 new tokens, each in [0, min(vocab_size, output width)) (a head wider
      than the vocabulary never yields an id the embedding lacks), plus the final cache
      when `return_cache`: the model's `ModelCache` (`MegalodonLM`) or `LlamaCache` of
      capacity P + T (`LlamaLM`).
    """
    tokens, cache = _generate_core(
        *_core_arguments(
            model,
            params,
            prompt_tokens,
            max_new_tokens,
            rng,
            temperature,
            top_k,
            top_p,
            min_p,
            stop_token,
        )
    )
    return (tokens, cache) if return_cache else tokens


def lower_generate(
    model: LanguageModel,
    params: Any,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop_token: int | None = None,
) -> jax.stages.Lowered:
    """The program `generate` runs for these arguments, lowered ahead of time.

    `.compile()` gives the executable (compile time, `memory_analysis()`, `cost_analysis()`);
    it is the same program `generate` dispatches to for the same shapes and switches. The
    compiled program maps the core's inputs to (tokens (B, T) int32, final cache: `ModelCache`
    or `LlamaCache`).
    """
    return _generate_core.lower(
        *_core_arguments(
            model,
            params,
            prompt_tokens,
            max_new_tokens,
            rng,
            temperature,
            top_k,
            top_p,
            min_p,
            stop_token,
        )
    )
