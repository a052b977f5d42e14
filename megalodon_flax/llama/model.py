"""The Llama baseline: pre-norm RMSNorm blocks, RoPE attention, SwiGLU FFN, tied LM head.

Parameters carry the same logical axis names as Megalodon's (`vocab`, `embed`, `value`,
`mlp`), so the sharding rules of `megalodon_flax.sharding` apply unchanged. Norm statistics,
RoPE, softmax and logits compute in float32; matmuls take `compute_dtype` inputs and
accumulate in float32.

For decoding, `LlamaLM` takes an explicit `LlamaCache` of fixed capacity: a call with L
tokens writes their keys and values at positions [length, length + L) and attends to every
filled position up to its own. Without a cache, `attention_mask` (B, L) marks the valid
(right-padded) tokens; padded keys are never attended.

Inputs are checked as `MegalodonLM`'s are (`layers.input_checks`): concrete token ids outside
[0, vocab_size), a mask that is not 0/1 right padding, a cache of another structure, config
or batch, or a call that does not fit the cache's capacity raise a ValueError. Under jit the
structure checks still raise; the value checks cannot, so an out-of-range id embeds as zeros
and its own logits are NaN, a row whose mask is not 0/1 right padding has NaN logits, and
a call overflowing the KV buffer has NaN logits everywhere (rather than overwriting slots).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_flax.layers import input_checks
from megalodon_flax.layers.attention import masked_attention
from megalodon_flax.layers.linear import Linear
from megalodon_flax.layers.norms import RMSNorm
from megalodon_flax.layers.remat import rematted
from megalodon_flax.layers.rotary import apply_rope, rope_frequencies
from megalodon_flax.layers.segments import check_segment_ids, segments_from_ids
from megalodon_flax.llama.cache import LayerKV, LlamaCache, init_cache
from megalodon_flax.llama.config import LlamaConfig


def _rms_norm(config: LlamaConfig, name: str) -> RMSNorm:
    """RMSNorm storing its scale directly (`scale`, initialized 1)."""
    return RMSNorm(config.norm_eps, param_name="scale", offset=0.0, name=name)


def _linear(config: LlamaConfig, name: str, features: int, axes: tuple[str, str]) -> Linear:
    return Linear(
        features=features,
        axes=axes,
        use_bias=False,
        kernel_init=nn.initializers.normal(config.init_std),
        param_dtype=config.params_jnp_dtype,
        compute_dtype=config.compute_jnp_dtype,
        name=name,
    )


class LlamaAttention(nn.Module):
    """Multi-head causal self-attention with half-split RoPE on absolute positions."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        kv: LayerKV | None,
        start: jax.Array | None,
        visible: jax.Array | None,
        deterministic: bool,
    ) -> tuple[jax.Array, LayerKV | None]:
        """x (B, L, D), positions (L,) or (B, L) → (B, L, D) and the updated KV buffers.

        `visible` (B, 1, L, L) bool, without `kv` only: which keys each query may see
        (replaces the causal rule; see `LlamaLM`).

        Without `kv`, position i attends to positions ≤ i of this call. With `kv` (capacity T)
        the call's keys and values are written at [start, start + L) and query i attends to
        buffer slots ≤ start + i.
        """
        cfg = self.config
        cd = cfg.compute_jnp_dtype
        batch, length, _ = x.shape
        heads, head_dim = cfg.num_heads, cfg.head_dim
        width = heads * head_dim

        def project(name: str) -> jax.Array:
            y = _linear(cfg, name, width, ("embed", "value"))(x)
            return y.reshape(batch, length, heads, head_dim)

        freqs = rope_frequencies(head_dim, cfg.rope_base)
        q = apply_rope(project("wq"), positions, freqs, "half_split")
        q = (q.astype(jnp.float32) * head_dim**-0.5).astype(cd)
        k = apply_rope(project("wk"), positions, freqs, "half_split").astype(cd)
        v = project("wv")
        if kv is None:
            keys, values = k, v
            key_positions = positions
        else:
            index = (0, start, 0, 0)
            keys = jax.lax.dynamic_update_slice(kv.keys, k, index)
            values = jax.lax.dynamic_update_slice(kv.values, v, index)
            kv = LayerKV(keys, values)
            key_positions = jnp.arange(keys.shape[1], dtype=positions.dtype)
        allowed = visible
        if allowed is None:
            allowed = key_positions[None, :] <= positions[:, None]  # (L, T) over (B, H)
        prob_dropout = None
        if cfg.attention_dropout > 0.0 and not deterministic:
            prob_dropout = nn.Dropout(cfg.attention_dropout, deterministic=False)
        out = masked_attention(q, keys, values, allowed, cd, prob_dropout)  # (B, L, H, Dh)
        out = out.reshape(batch, length, width)
        return _linear(cfg, "wo", cfg.model_dim, ("value", "embed"))(out), kv


class SwiGLU(nn.Module):
    """w2(silu(w1 x) ⊙ w3 x)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, L, D) → (B, L, D)."""
        cfg = self.config
        hidden = cfg.ffn_hidden_dim
        gate = jax.nn.silu(_linear(cfg, "w1", hidden, ("embed", "mlp"))(x))
        a = gate * _linear(cfg, "w3", hidden, ("embed", "mlp"))(x)
        a = nn.with_logical_constraint(a, ("batch", "length", "act_mlp"))
        return _linear(cfg, "w2", cfg.model_dim, ("mlp", "embed"))(a)


class LlamaBlock(nn.Module):
    """x + attn(RMSNorm(x)), then + SwiGLU(RMSNorm(·))."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        kv: LayerKV | None,
        start: jax.Array | None,
        visible: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, LayerKV | None]:
        """x (B, L, D) → (B, L, D) in the compute dtype and the updated KV buffers."""
        cfg = self.config
        cd = cfg.compute_jnp_dtype
        drop = nn.Dropout(cfg.dropout)
        h = _rms_norm(cfg, "attention_norm")(x).astype(cd)
        h, kv = LlamaAttention(cfg, name="attention")(
            h, positions, kv, start, visible, deterministic
        )
        x = x + drop(h, deterministic=deterministic)
        h = _rms_norm(cfg, "ffn_norm")(x).astype(cd)
        x = x + drop(SwiGLU(cfg, name="ffn")(h), deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), kv


class LlamaLM(nn.Module):
    """The causal LM: embedding, blocks, final RMSNorm, head tied to the embedding.

    Called like `MegalodonLM`: `logits, cache = model.apply(variables, tokens, cache=None,
    attention_mask=None, deterministic=True, return_cache=False)`, so the training loop,
    window evaluation and `sampling.generate` drive both.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        cache: LlamaCache | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        return_cache: bool = False,
    ) -> tuple[jax.Array, LlamaCache | None]:
        """tokens (B, L) int → float32 logits (B, L, V) and the updated cache.

        Without `cache` positions are 0..L-1 and the returned cache is None (a fresh decode
        needs a buffer: pass `llama.cache.init_cache(...)`). `return_cache` exists for
        signature parity with `MegalodonLM`; a given cache is always returned updated.
        `attention_mask` (B, L) bool or 0/1 marks valid tokens (right padding only); it cannot
        be combined with a cache. `segment_ids` (B, L) int packs documents in a row (0 =
        padding, a run starts where the id changes): attention stays inside each run and
        positions restart at its start; it cannot be combined with `attention_mask` or a
        cache. See the module docstring for the input checks.
        """
        del return_cache
        cfg = self.config
        tokens = input_checks.check_token_array(tokens)
        input_checks.check_token_range(tokens, cfg.vocab_size)
        if attention_mask is not None and cache is not None:
            raise ValueError(
                "attention_mask cannot be combined with a cache (cached calls take unpadded tokens)"
            )
        if segment_ids is not None and (attention_mask is not None or cache is not None):
            raise ValueError(
                "segment_ids cannot be combined with attention_mask (segment 0 is the padding) "
                "or a cache (packed rows start fresh)"
            )
        visible, row_ok = None, None
        length = tokens.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        if attention_mask is not None:
            key_valid, row_ok = input_checks.check_attention_mask(attention_mask, tokens.shape)
            visible = causal & key_valid[:, None, None, :]
        segments = None
        if segment_ids is not None:
            segments = segments_from_ids(check_segment_ids(segment_ids, tokens.shape))
            run = segments.run_start
            same_run = run[:, :, None] == run[:, None, :]
            valid = segments.valid
            visible = (causal & same_run & valid[:, :, None] & valid[:, None, :])[:, None]
        fits = None
        if cache is not None:
            fits = check_cache(cfg, cache, tokens.shape)
        cd = cfg.compute_jnp_dtype
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.model_dim),
            cfg.params_jnp_dtype,
        )
        start = None if cache is None else cache.length
        offset = 0 if start is None else start
        positions = offset + jnp.arange(length, dtype=jnp.int32)
        if segments is not None:
            positions = segments.position
        ids, valid = input_checks.in_vocabulary(tokens, cfg.vocab_size)
        x = jnp.take(embedding, ids, axis=0).astype(cd)
        x = jnp.where(valid[..., None], x, jnp.zeros((), cd))  # an out-of-range id: zeros
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        block = rematted(LlamaBlock, cfg.remat_policy, static_argnums=(6,))
        new_layers = []
        for i in range(cfg.num_layers):
            kv = None if cache is None else cache.layers[i]
            x, kv = block(cfg, name=f"layers_{i}")(x, positions, kv, start, visible, deterministic)
            new_layers.append(kv)
        h = _rms_norm(cfg, "norm")(x)
        logits = jnp.dot(h.astype(cd), embedding.astype(cd).T, preferred_element_type=jnp.float32)
        for ok in (row_ok, fits):
            if ok is not None:
                valid = valid & ok
        logits = input_checks.mark_invalid(logits, valid)
        if cache is None:
            return logits, None
        return logits, LlamaCache(tuple(new_layers), cache.length + length)


_CACHE_SHAPES = {
    ".layers[i].keys": "(B, capacity, num_heads, model_dim/num_heads)",
    ".layers[i].values": "(B, capacity, num_heads, model_dim/num_heads)",
    ".length": "() int",
}
_CACHE_ADVICE = (
    "Build it with megalodon_flax.llama.init_cache(config, batch_size, capacity) for this "
    "model's config, the batch size of the tokens and room for every position to decode."
)


@functools.lru_cache(maxsize=64)
def _expected_cache(config: LlamaConfig, batch_size: int, capacity: int) -> LlamaCache:
    return jax.eval_shape(lambda: init_cache(config, batch_size, capacity))


def check_cache(
    config: LlamaConfig, cache: object, tokens_shape: tuple[int, int]
) -> jax.Array | None:
    """Checks `cache` against `config` and the (B, L) tokens of a call.

    Raises a ValueError naming what differs: not a `LlamaCache` (e.g. a Megalodon cache), the
    layer count, the batch size, a leaf's shape or dtype kind (static, so also under jit);
    for a concrete `cache.length`, a call that does not fit: length + L > capacity.

    Returns:
      None for a concrete length, else a () bool, False when the call overflows the buffer
      (the caller then sets every logit of the call to NaN).
    """
    if not isinstance(cache, LlamaCache):
        kind = type(cache).__name__
        hint = " (a ModelCache belongs to MegalodonLM)" if kind == "ModelCache" else ""
        raise ValueError(f"cache must be a LlamaCache, got a {kind}{hint}. {_CACHE_ADVICE}")
    layers = cache.layers
    if not isinstance(layers, tuple | list) or len(layers) != config.num_layers:
        count = len(layers) if isinstance(layers, tuple | list) else type(layers).__name__
        raise ValueError(
            f"cache has {count} layers but config.num_layers = {config.num_layers}: it was "
            f"built for another config. {_CACHE_ADVICE}"
        )
    batch, length = tokens_shape
    shape = tuple(jnp.shape(layers[0].keys))
    if len(shape) != 4:
        raise ValueError(
            f"cache.layers[0].keys has shape {shape}, expected {_CACHE_SHAPES['.layers[i].keys']}"
            f". {_CACHE_ADVICE}"
        )
    if shape[0] != batch:
        raise ValueError(
            f"cache was built for batch size {shape[0]} but the tokens have batch size {batch}. "
            f"{_CACHE_ADVICE}"
        )
    capacity = shape[1]
    cache = cache.replace(layers=tuple(layers))  # a list of layers works in the model too
    expected = _expected_cache(config, batch, capacity)
    input_checks.check_cache_leaves(cache, expected, _CACHE_SHAPES, _CACHE_ADVICE)
    if input_checks.is_traced(cache.length):
        return cache.length + length <= capacity
    filled = int(cache.length)
    if not 0 <= filled <= capacity - length:
        raise ValueError(
            f"cache holds {filled} of its {capacity} positions; {length} more tokens do not fit "
            f"(need 0 <= length and length + {length} <= capacity). Build the cache with a "
            "larger capacity (prompt length + tokens to generate)."
        )
    return None
