"""Tests of the moving-average gated attention block (spec §2, §10 item 17): normalized Q/K.

Oracle: the norms of q and k predicted in float64 from the captured z (‖q‖ = ‖k‖ =
sqrt(m/(m+eps)), m = mean(z²) per head), with the Q/K affine at its zero init.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.megalodon import mega as attention_module
from megalodon_flax.megalodon.chunked_attention import chunked_attention
from megalodon_flax.megalodon.mega import MovingAverageGatedAttention
from tests.factories import tiny_megalodon_config

pytestmark = pytest.mark.usefixtures("highest_precision")


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------------------- item 17: Q/K norm
ATTN_CONFIG = tiny_megalodon_config(vocab_size=16, num_layers=1, ffn_hidden_dim=32, cema_ndim=2)


@functools.cache
def _attention_params() -> dict:
    module = MovingAverageGatedAttention(ATTN_CONFIG)
    x = jnp.zeros((2, 12, ATTN_CONFIG.model_dim), jnp.float32)
    return jax.jit(lambda key: nn.unbox(module.init(key, x)))(jax.random.PRNGKey(17))


@pytest.mark.parametrize("wz_scale", [1.0, 1e-3])
def test_normalized_qk_norms(monkeypatch: pytest.MonkeyPatch, wz_scale: float) -> None:
    """With γ_qk = β_qk = 0, ‖q‖ = ‖k‖ = sqrt(m/(m+eps)), m = mean(z²) per head.

    q and k are captured where the module hands them to the attention kernel, z where the
    wz projection returns it. A tiny wz makes m comparable to eps so eps is visible.
    """
    variables = jax.tree.map(lambda a: a, _attention_params())
    params = variables["params"]
    assert not np.any(np.asarray(params["gamma"])) and not np.any(np.asarray(params["beta"]))
    params["wz"]["kernel"] = params["wz"]["kernel"] * wz_scale
    params["wz"]["bias"] = jnp.zeros_like(params["wz"]["bias"])
    captured: dict[str, jax.Array] = {}

    def capture(q, k, v, *args, **kwargs):
        captured["q"], captured["k"] = q, k
        return chunked_attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module, "chunked_attention", capture)

    @jax.jit
    def run(variables: dict, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        _, state = MovingAverageGatedAttention(ATTN_CONFIG).apply(
            variables, x, capture_intermediates=True, mutable=["intermediates"]
        )
        # The captured arrays belong to this trace, so they can be returned from it.
        return state["intermediates"]["wz"]["__call__"][0], captured["q"], captured["k"]

    rng = np.random.default_rng(3)
    x = jnp.asarray(_normal(rng, (2, 12, ATTN_CONFIG.model_dim)))
    z, q, k = (np.asarray(a, np.float64) for a in run(variables, x))
    heads, dh = ATTN_CONFIG.num_heads, ATTN_CONFIG.head_dim
    m = np.mean(z.reshape(2, 12, heads, dh) ** 2, axis=-1)
    expected = np.sqrt(m / (m + ATTN_CONFIG.norm_eps))
    if wz_scale < 1.0:
        assert np.max(expected) < 0.99  # eps matters in this regime
    else:
        assert np.min(expected) > 1 - 1e-4
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), expected, rtol=2e-6, atol=0)
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), expected, rtol=2e-6, atol=0)
    # q and k coincide when γ = β = 0: the score of a token with itself is m/(m+eps), no
    # extra 1/sqrt(Dh) or temperature.
    self_scores = np.sum(q * k, axis=-1)
    np.testing.assert_allclose(self_scores, expected**2, rtol=4e-6, atol=0)
