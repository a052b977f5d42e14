"""Tests of the loss and metric helpers (megalodon_flax.training.metrics).

Oracle: the float64 NumPy cross-entropy of `tests/reference/losses.py`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.training import metrics
from tests.reference import losses


# ---------------------------------------------------------------------------------- losses
def test_weighted_loss_matches_numpy_and_ignores_padding() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (3, 7))
    weights = (rng.random((3, 7)) > 0.3).astype(np.float32)
    logits_bad = logits.copy()
    logits_bad[weights == 0] = np.nan  # padded positions may hold anything
    total, count, per_token = metrics.weighted_loss_sum(
        jnp.asarray(logits_bad), jnp.asarray(targets), jnp.asarray(weights)
    )
    want = losses.cross_entropy(logits, targets)
    np.testing.assert_allclose(float(total), (want * weights).sum(), rtol=1e-6)
    assert float(count) == weights.sum()
    np.testing.assert_allclose(np.asarray(per_token)[weights > 0], want[weights > 0], rtol=1e-5)
    assert metrics.nats_to_bits(math.log(256)) == pytest.approx(8.0)
