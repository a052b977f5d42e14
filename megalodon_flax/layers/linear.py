"""Dense layers with float32 accumulation and logical axis names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_flax.layers import initializers


class Linear(nn.Module):
    """y = x·kernel + bias with kernel stored as (in, out) (PyTorch weight transposed).

    Inputs and kernel are cast to `compute_dtype`; the product accumulates in float32 and the
    bias (always float32) is added before the single downcast to `compute_dtype`.

    Attributes:
      features: output width.
      axes: logical names of the kernel axes (in, out); the bias uses the out name.
      use_bias: whether a bias parameter exists.
      kernel_init: initializer of the (in, out) kernel.
      param_dtype: storage dtype of the kernel and bias.
      compute_dtype: dtype of the matmul inputs and (by default) of the output.
      output_dtype: dtype of the output if not compute_dtype (e.g. float32 logits).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = True
    kernel_init: initializers.Initializer = initializers.normal(0.02)
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = None

    @nn.compact
    def weights(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        """The stored kernel (in_features, features) and bias (features,) or None."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (in_features, self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(initializers.zeros, (self.axes[1],)),
                (self.features,),
                self.param_dtype,
            )
        return kernel, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., in) → (..., features) in output_dtype or compute_dtype."""
        return _apply([self], [self.weights(x.shape[-1])], x)[0]


def fused_linears(layers: Sequence[Linear], x: jax.Array) -> list[jax.Array]:
    """`[layer(x) for layer in layers]`, as one matmul over the concatenated kernels when x
    holds one token (x (B, 1, in)).

    Decoding one token makes every matmul a matrix-vector product bound by reading the
    kernel, and XLA's CPU runtime splits one large product across threads where it runs
    several small ones on one thread each; inside a decode loop the concatenation does not
    depend on the carried state, so XLA hoists it out of the loop. Longer inputs keep one
    matmul per layer, whose sharding follows that layer's logical axes. All layers must share
    the compute dtype; each output keeps its layer's dtype.
    """
    if x.shape[-2] != 1:
        return [layer(x) for layer in layers]
    return _apply(layers, [layer.weights(x.shape[-1]) for layer in layers], x)


def _apply(
    layers: Sequence[Linear], weights: Sequence[tuple[jax.Array, jax.Array | None]], x: jax.Array
) -> list[jax.Array]:
    """x · [kernel₀ | kernel₁ | …] in float32, then each layer's bias and output dtype."""
    cd = layers[0].compute_dtype
    kernels = [k.astype(cd) for k, _ in weights]
    kernel = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=1)
    y = jnp.dot(x.astype(cd), kernel, preferred_element_type=jnp.float32)
    outs, start = [], 0
    for layer, (_, bias) in zip(layers, weights, strict=True):
        part = y if len(layers) == 1 else y[..., start : start + layer.features]
        start += layer.features
        if bias is not None:
            part = part + bias.astype(jnp.float32)
        outs.append(part.astype(cd if layer.output_dtype is None else layer.output_dtype))
    return outs
