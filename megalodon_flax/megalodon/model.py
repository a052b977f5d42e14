"""The Megalodon block, the backbone and the causal language model (spec §2)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_flax.layers import initializers, input_checks
from megalodon_flax.layers.linear import Linear
from megalodon_flax.layers.remat import rematted
from megalodon_flax.layers.segments import Segments, check_segment_ids, segments_from_ids
from megalodon_flax.megalodon import context_parallel
from megalodon_flax.megalodon.cache import LayerCache, ModelCache, init_cache
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.ffn import NormalizedFFN
from megalodon_flax.megalodon.mega import MovingAverageGatedAttention
from megalodon_flax.megalodon.timestep_norm import TimestepNorm


class MegalodonBlock(nn.Module):
    """out = x + FFN(LN(x + h_attn(x))): gated attention sub-block, then the normalized FFN
    whose residual is the block input x (two-hop residual)."""

    config: MegalodonConfig
    layer_index: int = 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cache: LayerCache | None = None,
        mask: jax.Array | None = None,
        segments: Segments | None = None,
        deterministic: bool = True,
        return_cache: bool = False,
        layer_index: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x (B, L, D) → (B, L, D) and the layer's updated cache (None without a cache).

        `layer_index` () int, given under `nn.scan` (where the module attribute is shared by
        every layer), sets the per-layer FFN rescale at initialization.
        """
        y, cache = MovingAverageGatedAttention(self.config, name="attn")(
            x, cache, mask, segments, deterministic, return_cache
        )
        index = self.layer_index if layer_index is None else layer_index
        out = NormalizedFFN(self.config, index, name="ffn")(y, x, deterministic)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed")), cache


class MegalodonModel(nn.Module):
    """Embedding, the stack of blocks and the final streaming TimestepNorm."""

    config: MegalodonConfig

    def setup(self) -> None:
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.model_dim,
            embedding_init=nn.with_logical_partitioning(
                initializers.embedding(cfg.model_dim), ("vocab", "embed")
            ),
            dtype=cfg.compute_jnp_dtype,
            param_dtype=cfg.params_jnp_dtype,
        )
        block = rematted(
            MegalodonBlock, cfg.remat_policy, static_argnums=(5, 6), scanned=cfg.scan_layers
        )
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = scanned(cfg)
        else:
            self.layers = [block(cfg, i) for i in range(cfg.num_layers)]
        self.norm = TimestepNorm(cfg.norm_num_groups, cfg.norm_eps, cfg.timestep_norm_variant)
        self.embedding_dropout = nn.Dropout(cfg.dropout)

    def __call__(
        self,
        tokens: jax.Array,
        cache: ModelCache | None = None,
        mask: jax.Array | None = None,
        segments: Segments | None = None,
        deterministic: bool = True,
        return_cache: bool = False,
    ) -> tuple[jax.Array, ModelCache | None]:
        """tokens (B, L) int → final hidden states (B, L, D) compute dtype, updated cache.

        An id outside [0, vocab_size) (possible only in traced tokens; `MegalodonLM` refuses
        concrete ones) embeds as a zero vector, so it cannot reach other positions as NaN.
        """
        cfg = self.config
        ids, in_vocab = input_checks.in_vocabulary(tokens, cfg.vocab_size)
        x = self.embed(ids)
        x = jnp.where(in_vocab[..., None], x, jnp.zeros((), x.dtype))
        if cfg.scale_emb:
            x = x * jnp.asarray(math.sqrt(cfg.model_dim), x.dtype)
        if cfg.dropout > 0.0 and cfg.embedding_dropout:
            x = self.embedding_dropout(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        if cfg.scan_layers:
            indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            layer_caches = None if cache is None else cache.layers
            x, new_layers = self.layers(
                x, layer_caches, mask, segments, deterministic, return_cache, indices
            )
        else:
            new_layers = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else cache.layers[i]
                x, layer_cache = layer(x, layer_cache, mask, segments, deterministic, return_cache)
                new_layers.append(layer_cache)
            new_layers = tuple(new_layers)
        split = None
        if cache is None and not return_cache:
            split = context_parallel.active_split(*tokens.shape)
        final_cache = None if cache is None else cache.final_norm
        x, final_state = self.norm(x, final_cache, mask, split, segments)
        if cache is None and not return_cache:
            return x, None
        return x, ModelCache(layers=new_layers, final_norm=final_state)

    def embedding_logits(self, x: jax.Array) -> jax.Array:
        """Tied head: x (B, L, D) · embeddingᵀ → float32 (B, L, V)."""
        cd = self.config.compute_jnp_dtype
        table = self.embed.embedding.astype(cd)
        return jnp.dot(x.astype(cd), table.T, preferred_element_type=jnp.float32)


class MegalodonLM(nn.Module):
    """Causal language model.

    Called as `logits, cache = model.apply(variables, tokens, cache=None, attention_mask=None,
    deterministic=True)`: tokens (B, L) int32 → logits (B, L, V_out) float32. With `cache`
    (from `init_cache` or a previous call) the call continues the streams and returns the
    updated cache; without it every row starts fresh and the returned cache is None.
    `return_cache=True` without a cache starts fresh streams on the vectorized path and
    returns their cache (a faster prefill than passing `init_cache`). `attention_mask`
    (B, L) bool or 0/1 marks valid tokens (right padding only); it cannot be combined with
    a cache. `segment_ids` (B, L) int packs several documents in a row (0 = padding; a run
    starts wherever the id changes, spec §5.7): each document's logits are those of the
    document alone. It cannot be combined with `attention_mask`, a cache or `return_cache`.
    Dropout needs `rngs={'dropout': key}` when `deterministic=False`.

    Input checks (`layers.input_checks`): a concrete call raises a ValueError for token ids
    outside [0, vocab_size) (negative ids are not wrapped), for a mask that is not 0/1 or
    not right padding, and for a cache whose structure does not match the config and the
    batch (layer count, batch size, widths, chunk size, dtype kinds, another family's
    cache). Under jit the cache check still raises (shapes are static) but values are
    unknown, so instead: an out-of-range id embeds as zeros and its own logits are NaN
    (other positions stay finite; earlier ones unchanged up to the float rounding of the
    FFT CEMA path, later ones see a blank token), and every logit of a row whose mask is not
    0/1 right padding is NaN.
    """

    config: MegalodonConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        cache: ModelCache | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        return_cache: bool = False,
    ) -> tuple[jax.Array, ModelCache | None]:
        cfg = self.config
        tokens = input_checks.check_token_array(tokens)
        input_checks.check_token_range(tokens, cfg.vocab_size)
        segments = None
        if segment_ids is not None:
            segments = _packed_segments(cfg, segment_ids, tokens.shape, attention_mask, cache)
            if return_cache:
                raise ValueError("segment_ids cannot be combined with return_cache")
        if attention_mask is not None and (cache is not None or return_cache):
            raise ValueError(
                "attention_mask cannot be combined with a cache (streaming calls "
                "take unpadded tokens)"
            )
        mask, row_ok = None, None
        if attention_mask is not None:
            mask, row_ok = input_checks.check_attention_mask(attention_mask, tokens.shape)
        if cache is not None:
            check_cache(cfg, cache, tokens.shape[0])
        _reject_float16(self.variables)
        model = MegalodonModel(cfg, name="model")
        hidden, cache = model(tokens, cache, mask, segments, deterministic, return_cache)
        if cfg.tied:
            logits = model.embedding_logits(hidden)
        else:
            logits = Linear(
                cfg.output_width,
                ("embed", "vocab"),
                use_bias=False,
                kernel_init=initializers.embedding(cfg.model_dim),
                param_dtype=cfg.params_jnp_dtype,
                compute_dtype=cfg.compute_jnp_dtype,
                output_dtype=jnp.float32,
                name="lm_head",
            )(hidden)
        valid = (tokens >= 0) & (tokens < cfg.vocab_size)
        if row_ok is not None:
            valid = valid & row_ok
        return input_checks.mark_invalid(logits, valid), cache


_CACHE_SHAPES = {
    ".layers[i].norm.count": "(B,)",
    ".layers[i].norm.count_high": "(B,)",
    ".layers[i].norm.mean": "(B, norm_num_groups)",
    ".layers[i].norm.mean_c": "(B, norm_num_groups)",
    ".layers[i].norm.var": "(B, norm_num_groups)",
    ".layers[i].norm.var_c": "(B, norm_num_groups)",
    ".layers[i].cema": "(B, model_dim, cema_ndim)",
    ".layers[i].attn.keys": "(B·num_heads, z_dim/num_heads, chunk_size)",
    ".layers[i].attn.values": "(B·num_heads, chunk_size, value_dim/num_heads)",
    ".layers[i].position": "() int",
    ".final_norm.count": "(B,)",
    ".final_norm.count_high": "(B,)",
    ".final_norm.mean": "(B, norm_num_groups)",
    ".final_norm.mean_c": "(B, norm_num_groups)",
    ".final_norm.var": "(B, norm_num_groups)",
    ".final_norm.var_c": "(B, norm_num_groups)",
}
_STACKED_CACHE_SHAPES = {
    ".layers.norm.count": "(num_layers, B)",
    ".layers.norm.count_high": "(num_layers, B)",
    ".layers.norm.mean": "(num_layers, B, norm_num_groups)",
    ".layers.norm.mean_c": "(num_layers, B, norm_num_groups)",
    ".layers.norm.var": "(num_layers, B, norm_num_groups)",
    ".layers.norm.var_c": "(num_layers, B, norm_num_groups)",
    ".layers.cema": "(num_layers, B, model_dim, cema_ndim)",
    ".layers.attn.keys": "(num_layers, B·num_heads, z_dim/num_heads, chunk_size)",
    ".layers.attn.values": "(num_layers, B·num_heads, chunk_size, value_dim/num_heads)",
    ".layers.position": "(num_layers,) int",
    **{key: shape for key, shape in _CACHE_SHAPES.items() if key.startswith(".final")},
}
_CACHE_ADVICE = (
    "Start the streams with megalodon_flax.init_cache(config, batch_size) for this model's "
    "config and the batch size of the tokens (or pass return_cache=True without a cache)."
)


@functools.lru_cache(maxsize=64)
def _expected_cache(config: MegalodonConfig, batch_size: int) -> ModelCache:
    return jax.eval_shape(lambda: init_cache(config, batch_size))


def check_cache(config: MegalodonConfig, cache: object, batch_size: int) -> None:
    """Raises a ValueError naming what differs when `cache` is not a `ModelCache` of
    `config` for `batch_size` streams: its type (e.g. a Llama cache), its layer count, its
    batch size, then every leaf's shape and dtype kind. Shapes only, so it works under jit.
    """
    if not isinstance(cache, ModelCache):
        kind = type(cache).__name__
        hint = " (a LlamaCache belongs to LlamaLM)" if kind == "LlamaCache" else ""
        raise ValueError(
            f"cache must be a Megalodon ModelCache, got a {kind}{hint}. {_CACHE_ADVICE}"
        )
    layers = cache.layers
    if config.scan_layers:
        if not isinstance(layers, LayerCache):
            raise ValueError(
                "cache holds a tuple of per-layer caches but config.scan_layers is on (its "
                f"cache stacks the layers on a leading axis). {_CACHE_ADVICE}"
            )
    elif not isinstance(layers, tuple | list) or len(layers) != config.num_layers:
        if isinstance(layers, LayerCache):
            count = "stacked"
        else:
            count = len(layers) if isinstance(layers, tuple | list) else type(layers).__name__
        raise ValueError(
            f"cache has {count} layers but config.num_layers = {config.num_layers} (and "
            f"scan_layers off): it was built for another config. {_CACHE_ADVICE}"
        )
    cache_batch = jnp.shape(cache.final_norm.count)[:1]
    if cache_batch != (batch_size,):
        raise ValueError(
            f"cache was built for batch size {cache_batch[0] if cache_batch else '?'} but the "
            f"tokens have batch size {batch_size}. {_CACHE_ADVICE}"
        )
    expected = _expected_cache(config, batch_size)
    if config.scan_layers:
        shapes = _STACKED_CACHE_SHAPES
    else:
        cache = cache.replace(layers=tuple(layers))  # a list of layers works in the model too
        shapes = _CACHE_SHAPES
    input_checks.check_cache_leaves(cache, expected, shapes, _CACHE_ADVICE)


def _packed_segments(
    config: MegalodonConfig,
    segment_ids: jax.Array,
    shape: tuple[int, ...],
    attention_mask: jax.Array | None,
    cache: ModelCache | None,
) -> Segments:
    """The run layout of checked segment ids; raises for what packed rows cannot take.

    A context split needs at least `chunk_size` tokens per shard (`sharded_packed_attention`
    says so when it is traced).
    """
    if attention_mask is not None or cache is not None:
        raise ValueError(
            "segment_ids cannot be combined with attention_mask (segment 0 is the padding) "
            "or a cache (packed rows start fresh)"
        )
    if config.timestep_norm_variant != "upstream":
        raise ValueError("segment_ids need timestep_norm_variant='upstream'")
    # The layout of the whole rows, before any split: positions count from each run's start.
    return segments_from_ids(check_segment_ids(segment_ids, shape))


def _reject_float16(variables) -> None:
    for leaf in jax.tree.leaves(variables):
        if getattr(leaf, "dtype", None) == jnp.float16:
            raise ValueError(
                "float16 parameters are not supported (CEMA powers and TimestepNorm moments "
                "overflow or lose precision in float16); use float32 or bfloat16"
            )
