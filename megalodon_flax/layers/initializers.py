"""Parameter initializers of spec §6 (upstream semantics), as Flax init functions.

Every initializer samples in float32 and casts to the requested dtype, so bf16-stored
parameters see the same distribution as fp32 ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]


def truncated_normal(std: float, bound_in_std: float) -> Initializer:
    """Normal(0, std²) truncated at ±bound_in_std·std (the truncation lowers the std)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        draw = jax.random.truncated_normal(key, -bound_in_std, bound_in_std, shape, jnp.float32)
        return (draw * std).astype(dtype)

    return init


def normal(std: float) -> Initializer:
    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


def constant(value: float) -> Initializer:
    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        del key
        return jnp.full(shape, value, dtype)

    return init


zeros = constant(0.0)


def linear_kernel(init_mode: str, fan_in: int, fan_out: int) -> Initializer:
    """Initializer of an internal linear kernel stored as (in, out).

    he: Normal(0, 1/(3·fan_in)) (PyTorch kaiming_normal_ with a=√5); bert: Normal(0, 0.02²);
    gaussian: truncated Normal std 1 cut at ±3; xavier: Uniform(±sqrt(6/(fan_in+fan_out))).
    """
    if init_mode == "he":
        return normal(1.0 / math.sqrt(3.0 * fan_in))
    if init_mode == "bert":
        return normal(0.02)
    if init_mode == "gaussian":
        return truncated_normal(1.0, 3.0)
    if init_mode == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))

        def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
            draw = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
            return draw.astype(dtype)

        return init
    raise ValueError(f"unknown init_mode {init_mode!r}")


def embedding(model_dim: int) -> Initializer:
    """Embedding / untied head: truncated Normal, std 1/sqrt(D), cut at ±3 std."""
    return truncated_normal(1.0 / math.sqrt(model_dim), 3.0)


def cema_theta(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """logit(f_π(d)) with f_k = D^(-k/D), k = 1..D, π a random permutation; shape (D, 1, 1)."""
    dim = shape[0]
    k = jnp.arange(1, dim + 1, dtype=jnp.float32)
    freqs = jnp.exp(-k * math.log(dim) / dim)
    freqs = jnp.clip(freqs, 1e-6, 1.0 - 1e-6)
    freqs = jax.random.permutation(key, freqs)
    logits = jnp.log(freqs) - jnp.log1p(-freqs)
    return logits.reshape(shape).astype(dtype)


def ffn_rescale(layer_index: int) -> Initializer:
    """FFN output scale 0.1·0.5^i of the `rescale_nffn` option."""
    return constant(0.1 * 0.5**layer_index)
