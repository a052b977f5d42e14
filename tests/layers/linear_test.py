"""Linear layers (megalodon_flax.layers.linear).

Oracles: the float64 product x·W + b for `Linear`, and the same layers applied one by one for
`fused_linears` (same parameters, outputs and dtypes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.layers.linear import Linear, fused_linears


class _Separate(nn.Module):
    specs: tuple[tuple[int, bool], ...]
    compute_dtype: jnp.dtype = jnp.float32

    def layers(self) -> list[Linear]:
        return [
            Linear(width, ("embed", "mlp"), use_bias=bias, compute_dtype=self.compute_dtype)
            for width, bias in self.specs
        ]

    @nn.compact
    def __call__(self, x: jax.Array, fused: bool) -> list[jax.Array]:
        layers = self.layers()
        return fused_linears(layers, x) if fused else [layer(x) for layer in layers]


def _params_with_biases(module: _Separate, x: jax.Array) -> dict:
    params = nn.unbox(module.init(jax.random.PRNGKey(0), x, False))["params"]
    # Biases start at zero; give them values so that the test sees where they are added.
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf + 0.5 if path[-1].key == "bias" else leaf, params
    )


def test_linear_matches_float64_product() -> None:
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 16))
    module = _Separate(((24, True),))
    params = _params_with_biases(module, x)
    (y,) = module.apply({"params": params}, x, False)
    layer = params["Linear_0"]
    expected = np.asarray(x, np.float64) @ np.asarray(layer["kernel"], np.float64) + np.asarray(
        layer["bias"], np.float64
    )
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_fused_linears_equal_separate_layers(compute_dtype) -> None:
    """Same parameters (names, shapes), same outputs and dtypes, with and without biases."""
    specs = ((12, True), (7, False), (20, True))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 1, 16))
    module = _Separate(specs, compute_dtype)
    params = _params_with_biases(module, x)
    fused_params = nn.unbox(module.init(jax.random.PRNGKey(0), x, True))["params"]
    assert jax.tree.map(jnp.shape, fused_params) == jax.tree.map(jnp.shape, params)
    separate = module.apply({"params": params}, x, False)
    fused = module.apply({"params": params}, x, True)
    for (width, _), a, b in zip(specs, separate, fused, strict=True):
        assert a.shape == b.shape == (3, 1, width)
        assert a.dtype == b.dtype == compute_dtype
        tol = 1e-6 if compute_dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
        )
