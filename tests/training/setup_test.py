"""Tests of the training setup (megalodon_flax.training.setup): shardings and batch layout.

Oracles: the logical-axis rules (which mesh axes each parameter and batch dimension must
map to) and the row order of the micro-batches worked out by hand.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from megalodon_flax.training.setup import setup_training
from megalodon_flax.training.steps import create_train_state
from tests.factories import tiny_train_config


def test_state_shardings_follow_logical_rules() -> None:
    setup = setup_training(tiny_train_config())
    emb = setup.state_shardings.params["model"]["embed"]["embedding"]
    assert tuple(emb.spec) == ("tensor", "fsdp")
    mu = setup.state_shardings.opt_state[1][0].mu["model"]["embed"]["embedding"]
    assert tuple(mu.spec) == ("tensor", "fsdp")
    assert tuple(setup.train_batch_sharding.spec) == (None, ("data", "fsdp"), "context")
    boxed = jax.eval_shape(lambda: create_train_state(jax.random.PRNGKey(0), setup.model, setup.tx))
    assert isinstance(boxed.params["model"]["embed"]["embedding"], nn.LogicallyPartitioned)


def test_global_train_batch_groups_rows_into_micro_batches() -> None:
    """Row r of the effective batch is row r // A of micro-batch r % A."""
    setup = setup_training(tiny_train_config(batch_size=2, grad_accum_steps=3))
    rows = np.arange(6 * 16, dtype=np.int32).reshape(6, 16)
    batch = setup.global_train_batch({"inputs": rows, "targets": rows, "weights": rows * 1.0})
    got = np.asarray(batch["inputs"])
    assert got.shape == (3, 2, 16)
    for r in range(6):
        np.testing.assert_array_equal(got[r % 3, r // 3], rows[r])
