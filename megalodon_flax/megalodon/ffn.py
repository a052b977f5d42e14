"""Normalized feed-forward network with the two-hop residual (spec §2.4)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_flax.layers import initializers
from megalodon_flax.layers.linear import fused_linears
from megalodon_flax.layers.norms import LayerNorm
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.internal_linear import internal_linear


class NormalizedFFN(nn.Module):
    """out = residual + α ⊙ fc2(act(fc1(LN(y)))), act = silu or swiglu with fc3.

    Attributes:
      config: model configuration.
      layer_index: 0-based block index (sets the rescale α = 0.1·0.5^i).
    """

    config: MegalodonConfig
    layer_index: int = 0

    @nn.compact
    def __call__(self, y: jax.Array, residual: jax.Array, deterministic: bool = True) -> jax.Array:
        """y, residual (B, L, D) → residual + f (B, L, D) in the compute dtype."""
        cfg = self.config
        cd = cfg.compute_jnp_dtype
        dim, hidden = y.shape[-1], cfg.ffn_hidden_dim
        u = LayerNorm(cfg.norm_eps, cfg.norm_affine, name="norm")(y).astype(cd)
        fc1 = internal_linear(cfg, "fc1", hidden, ("embed", "mlp"), dim)
        if cfg.swiglu:
            fc3 = internal_linear(cfg, "fc3", hidden, ("embed", "mlp"), dim)
            a1, a3 = fused_linears([fc1, fc3], u)
            a = jax.nn.silu(a1) * a3
        else:
            a = jax.nn.silu(fc1(u))
        a = nn.with_logical_constraint(a, ("batch", "length", "act_mlp"))
        if cfg.hidden_dropout > 0.0:
            a = nn.Dropout(cfg.hidden_dropout)(a, deterministic=deterministic)
        f = internal_linear(cfg, "fc2", dim, ("mlp", "embed"), hidden)(a)
        if cfg.dropout > 0.0:
            f = nn.Dropout(cfg.dropout)(f, deterministic=deterministic)
        if cfg.rescale_nffn:
            alpha = self.param(
                "alpha",
                nn.with_logical_partitioning(
                    initializers.ffn_rescale(self.layer_index), ("embed",)
                ),
                (dim,),
            )
            f = (f.astype(jnp.float32) * alpha).astype(cd)
        return residual + f
