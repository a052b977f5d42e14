"""Tests of the optimizer and the learning-rate schedules (megalodon_flax.training.optimizer).

Oracles: the schedules' float64 formulas written out here, and AdamW's first update worked out
by hand (with eps = 1 it reveals the clipping; with zero gradients, the weight decay alone).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.training import optimizer
from tests.factories import tiny_train_config


# ------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("kind", ["cosine", "linear", "rsqrt", "constant"])
def test_learning_rate_schedule_matches_float64_formula(kind: str) -> None:
    config = tiny_train_config(
        schedule={"kind": kind, "warmup_steps": 10, "min_lr_ratio": 0.1},
        optimizer={"learning_rate": 4e-4},
        num_train_steps=110,
    )
    fn = optimizer.create_learning_rate_fn(config)
    peak, warmup, total, floor = 4e-4, 10, 110, 0.1
    for step in [0, 1, 4, 9, 10, 11, 35, 60, 109, 110, 150]:
        if step < warmup:
            want = peak * (step + 1) / warmup
        else:
            p = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
            want = {
                "cosine": peak * (floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2),
                "linear": peak * (1 - (1 - floor) * p),
                "rsqrt": peak * math.sqrt(warmup / max(step + 1, warmup)),
                "constant": peak,
            }[kind]
        np.testing.assert_allclose(float(fn(step)), want, rtol=1e-6, err_msg=f"{kind} {step}")
    # Peak reached at the end of the warmup; cosine/linear end at the floor.
    assert float(fn(warmup - 1)) == pytest.approx(peak, rel=1e-6)
    if kind in ("cosine", "linear"):
        assert float(fn(total)) == pytest.approx(peak * floor, rel=1e-6)


def test_constant_schedule_without_warmup_is_flat() -> None:
    config = tiny_train_config(schedule={"kind": "constant", "warmup_steps": 0})
    fn = optimizer.create_learning_rate_fn(config)
    values = np.array([float(fn(s)) for s in range(0, 50, 7)])
    np.testing.assert_array_equal(values, np.float32(1e-2))


# --------------------------------------------------------------------------- optimizer
def test_weight_decay_mask_matrices_skips_vectors() -> None:
    config = tiny_train_config(
        optimizer={"weight_decay": 0.5, "weight_decay_mask": "matrices", "grad_clip_norm": 0.0}
    ).optimizer
    tx = optimizer.create_optimizer(config, lambda step: 0.1)
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["b"]), 0.0)
    config = dataclasses.replace(config, weight_decay_mask="all")
    tx = optimizer.create_optimizer(config, lambda step: 0.1)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["b"]), -0.1 * 0.5, rtol=1e-6)


def test_gradient_clipping_applies_before_adamw() -> None:
    """With eps = 1, Adam's first update is -lr * g / (|g| + 1), which reveals the clipping."""
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # global norm 50
    params = {"w": jnp.zeros((3,))}
    for clip, g in ((1.0, np.array([0.6, 0.8, 0.0])), (0.0, np.array([30.0, 40.0, 0.0]))):
        config = tiny_train_config(
            optimizer={"grad_clip_norm": clip, "weight_decay": 0.0, "adam_eps": 1.0}
        )
        tx = optimizer.create_optimizer(config.optimizer, lambda step: 1.0)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -g / (np.abs(g) + 1.0), rtol=1e-6)
