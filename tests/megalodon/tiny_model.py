"""The tiny Megalodon the model tests share: its config, spec-drawn parameters, tokens and
one-shot reference logits."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from megalodon_flax.megalodon import MegalodonLM
from megalodon_flax.megalodon.config import MegalodonConfig
from tests.factories import tiny_megalodon_config

TINY = tiny_megalodon_config(
    model_dim=64, num_heads=4, z_dim=64, value_dim=64, ffn_hidden_dim=128, swiglu=True
)
BATCH = 2
LENGTH = 40


def path_names(path: tuple) -> list[str]:
    return [str(getattr(p, "key", p)) for p in path]


@functools.cache
def param_shapes(cfg: MegalodonConfig) -> dict:
    """Abstract parameter tree (shapes and dtypes) of `MegalodonLM(cfg)`."""
    model = MegalodonLM(cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), tokens)))


@functools.cache
def random_params(cfg: MegalodonConfig, seed: int = 0) -> dict:
    """Parameters drawn per spec §6 with every path exercised: gamma_imag ~ N(0,1) and
    nonzero biases, norm affines and Q/K gamma/beta. Drawn in NumPy, stored in each leaf's
    dtype."""
    rng = np.random.default_rng(seed)
    dim = cfg.model_dim

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        names = path_names(path)
        name, parent = names[-1], names[-2]
        shape = leaf.shape
        if name == "embedding" or parent == "lm_head":
            value = np.clip(rng.standard_normal(shape), -3, 3) / math.sqrt(dim)
        elif name == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(3 * shape[0])
        elif parent == "cema" and name in ("alpha", "delta"):
            value = 0.2 * rng.standard_normal(shape)
        elif parent == "cema" and name == "theta":
            freqs = dim ** (-np.arange(1, dim + 1) / dim)
            freqs = np.clip(rng.permutation(freqs), 1e-6, 1 - 1e-6)
            value = np.log(freqs / (1 - freqs)).reshape(shape)
        elif parent == "cema" and name in ("gamma_real", "gamma_imag"):
            value = rng.standard_normal(shape)
        elif parent == "cema" and name == "omega":
            value = np.clip(0.25 * rng.standard_normal(shape), -1, 1)
        elif name == "alpha":  # FFN rescale
            layer = int(names[-3].split("_")[-1])
            value = 0.1 * 0.5**layer * (1 + 0.1 * rng.standard_normal(shape))
        else:  # biases, norm scales/offsets, Q/K gamma/beta
            value = 0.1 * rng.standard_normal(shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


@functools.cache
def jitted_apply(cfg: MegalodonConfig):
    return jax.jit(MegalodonLM(cfg).apply)


def tokens_for(cfg: MegalodonConfig, length: int = LENGTH, seed: int = 1) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, cfg.vocab_size, size=(BATCH, length)), jnp.int32)


@functools.cache
def reference_logits(cfg: MegalodonConfig, seed: int = 0) -> np.ndarray:
    """One-shot uncached logits of the length-40 token batch."""
    logits, cache = jitted_apply(cfg)(random_params(cfg, seed), tokens_for(cfg))
    assert cache is None
    return np.asarray(logits)


def abstract(tree: object) -> object:
    """Shapes, dtypes and weak types of a pytree's leaves."""
    return jax.tree.map(lambda a: (a.shape, a.dtype, bool(getattr(a, "weak_type", False))), tree)
