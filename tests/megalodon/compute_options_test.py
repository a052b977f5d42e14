"""Options that must not change the function: parameter and compute dtypes (spec §10 item
29), remat policies and the attention kernel (item 30).

Oracles: the float32 model for the bfloat16 policy, the plain unrolled model without remat
for every remat policy and layout, and the xla attention kernel for `dot_product`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.config_base import ConfigError
from megalodon_flax.megalodon import MegalodonLM, init_cache, layer_stack
from megalodon_flax.megalodon.config import MegalodonConfig
from tests.megalodon.tiny_model import (
    BATCH,
    TINY,
    abstract,
    jitted_apply,
    param_shapes,
    path_names,
    random_params,
    reference_logits,
    tokens_for,
)
from tests.reference import losses

pytestmark = pytest.mark.usefixtures("highest_precision")


# ----------------------------------------------------------------------------- item 29
def _sensitive(names: list[str]) -> bool:
    if names[-2] == "cema" or names[-1] in ("gamma", "beta", "alpha"):
        return True
    return names[-2] in ("timenorm", "rmsnorm", "norm")


def test_param_dtype_policy() -> None:
    """param_dtype='bfloat16' stores ordinary kernels/biases/embedding as bf16 and the
    sensitive set (CEMA, every norm, Q/K gamma/beta, FFN alpha) as fp32."""
    cfg = TINY.replace(
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        rescale_nffn=True,
        tie_policy="explicit",
    )
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    seen = {"sensitive": 0, "ordinary": 0}
    for path, leaf in flat:
        names = path_names(path)
        if _sensitive(names):
            assert leaf.dtype == jnp.float32, names
            seen["sensitive"] += 1
        else:
            assert leaf.dtype == jnp.bfloat16, names
            seen["ordinary"] += 1
    assert seen["sensitive"] > 0 and seen["ordinary"] > 0
    # bf16 compute with fp32 storage keeps every parameter fp32.
    fp32_storage = param_shapes(TINY.replace(compute_dtype="bfloat16"))
    assert {leaf.dtype for leaf in jax.tree.leaves(fp32_storage)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_compute_loss_close_to_fp32() -> None:
    """bf16 compute: fp32 logits and a loss within 1e-2 relative of the fp32 model."""
    cfg = TINY.replace(compute_dtype="bfloat16")
    tokens = tokens_for(TINY)
    logits, _ = jitted_apply(cfg)(random_params(TINY), tokens)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    loss16 = losses.next_token_loss(np.asarray(logits), tokens)
    loss32 = losses.next_token_loss(reference_logits(TINY), tokens)
    assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)
    # bf16 compute is really used: logits differ from fp32 beyond fp32 rounding.
    assert np.max(np.abs(np.asarray(logits) - reference_logits(TINY))) > 1e-4


def test_bfloat16_streaming_state_dtypes() -> None:
    """bf16 storage and compute in a cached call: CEMA state complex64, TimestepNorm moments
    fp32, counts int32, KV ring bf16, logits fp32 with a loss within 1e-2 of fp32."""
    cfg = TINY.replace(compute_dtype="bfloat16", param_dtype="bfloat16")
    shapes = param_shapes(cfg)
    params = jax.tree.map(lambda p, s: p.astype(s.dtype), random_params(TINY), shapes)
    tokens = tokens_for(TINY)[:, :13]
    fresh = init_cache(cfg, BATCH)
    logits, cache = jitted_apply(cfg)(params, tokens, cache=fresh)
    assert logits.dtype == jnp.float32
    assert abstract(cache) == abstract(fresh)
    for layer in cache.layers:
        assert layer.cema.dtype == jnp.complex64
        assert layer.norm.mean.dtype == jnp.float32 and layer.norm.var.dtype == jnp.float32
        assert layer.norm.count.dtype == jnp.int32
        assert layer.attn.keys.dtype == jnp.bfloat16
        assert layer.attn.values.dtype == jnp.bfloat16
    assert cache.final_norm.mean.dtype == jnp.float32
    assert cache.final_norm.var.dtype == jnp.float32
    loss = losses.next_token_loss(np.asarray(logits), tokens)
    loss32 = losses.next_token_loss(reference_logits(TINY)[:, :13], tokens)
    assert abs(loss - loss32) <= 1e-2 * abs(loss32)


def test_float16_is_refused() -> None:
    """float16 is rejected by the config and when float16 parameters reach apply."""
    for field in ("param_dtype", "compute_dtype"):
        with pytest.raises(ConfigError, match=field):
            TINY.replace(**{field: "float16"})
    params16 = jax.tree.map(lambda p: p.astype(jnp.float16), random_params(TINY))
    with pytest.raises(ValueError, match="float16"):
        MegalodonLM(TINY).apply(params16, tokens_for(TINY, length=4))


# ----------------------------------------------------------------------------- item 30
def _loss_fn(cfg: MegalodonConfig):
    model = MegalodonLM(cfg)

    def loss(params: dict, tokens: jax.Array) -> jax.Array:
        logits, _ = model.apply(params, tokens)
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
        return -jnp.mean(picked)

    return jax.jit(jax.value_and_grad(loss))


@functools.cache
def _plain_loss_and_grads():
    return _loss_fn(TINY)(random_params(TINY, seed=30), tokens_for(TINY, length=16, seed=30))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy", "scan_layers"),
    [
        ("full", False),
        ("save_dots_no_batch", False),
        ("save_dots", True),
        ("save_dots_spectra_probs", True),
    ],
)
def test_remat_gives_identical_loss_and_gradients(policy: str, scan_layers: bool) -> None:
    """Every remat policy recomputes (part of) the blocks in the backward pass, unrolled or
    scanned: the loss and gradients of the plain unrolled model (1e-6)."""
    params = random_params(TINY, seed=30)
    tokens = tokens_for(TINY, length=16, seed=30)
    loss, grads = _plain_loss_and_grads()
    cfg = TINY.replace(remat_policy=policy, scan_layers=scan_layers)
    loss_r, grads_r = _loss_fn(cfg)(layer_stack.to_layout(params, scan_layers), tokens)
    grads_r = layer_stack.to_layout(grads_r, scan_layers=False)
    np.testing.assert_allclose(float(loss_r), float(loss), atol=1e-6, rtol=1e-6)
    assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
    for got, want in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
    # Gradients reach every parameter (including CEMA and Q/K affine).
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


def test_dot_product_attention_kernel_gives_the_xla_loss_and_gradients() -> None:
    """`attention_impl='dot_product'` (jax.nn.dot_product_attention, chunks folded into the
    batch; Dv = 16 ≠ Dh = 8 here) gives the xla kernel's loss and gradients (1e-5, fp32)."""
    cfg = TINY.replace(value_dim=64, z_dim=32, attention_impl="xla")
    params = random_params(cfg, seed=31)
    tokens = tokens_for(cfg, length=3 * cfg.chunk_size + 5, seed=31)
    loss, grads = _loss_fn(cfg)(params, tokens)
    loss_d, grads_d = _loss_fn(cfg.replace(attention_impl="dot_product"))(params, tokens)
    np.testing.assert_allclose(float(loss_d), float(loss), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads_d), jax.tree.leaves(grads), strict=True):
        scale = float(np.max(np.abs(want))) + 1e-12
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0)
