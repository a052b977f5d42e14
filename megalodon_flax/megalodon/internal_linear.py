"""The block's internal linears (wz, wv, wr, wh1, wh2, fc1-3) built from the config."""

from __future__ import annotations

from megalodon_flax.layers import initializers
from megalodon_flax.layers.linear import Linear
from megalodon_flax.megalodon.config import MegalodonConfig


def internal_linear(
    config: MegalodonConfig, name: str, features: int, axes: tuple[str, str], fan_in: int
) -> Linear:
    """One of the block's linears (wz, wv, wr, wh1, wh2, fc1-3): bias per `bias_topology`,
    kernel initialized per `init_mode`, the config's storage and compute dtypes."""
    return Linear(
        features=features,
        axes=axes,
        use_bias=config.linear_has_bias(name),
        kernel_init=initializers.linear_kernel(config.init_mode, fan_in, features),
        param_dtype=config.params_jnp_dtype,
        compute_dtype=config.compute_jnp_dtype,
        name=name,
    )
