"""Tests of the training setup (megalodon_flax.training.setup): shardings, batch layout and
the compiler options of the jitted steps.

Oracles: the logical-axis rules (which mesh axes each parameter and batch dimension must
map to), the row order of the micro-batches worked out by hand, XLA's refusal of an unknown
option (the options reach the compiler), and the same steps compiled at XLA's default level.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from megalodon_flax.compiler_options import CPU_OPTIONS, compiler_options
from megalodon_flax.training import setup as training_setup
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


def _local_batch(config, seed: int) -> dict[str, np.ndarray]:
    rows = config.batch_size * config.grad_accum_steps
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, 256, size=(rows, config.seq_len), dtype=np.int32)
    return {
        "inputs": inputs,
        "targets": np.roll(inputs, -1, axis=1),
        "weights": np.ones(inputs.shape, np.float32),
    }


def test_the_steps_pass_their_compiler_options_to_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        training_setup, "compiler_options", lambda platform: {"xla_no_such_option": 1}
    )
    setup = setup_training(tiny_train_config())
    config = setup.config
    abstract_batch = {
        key: jax.ShapeDtypeStruct(shape, dtype)
        for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))
        for shape in [(config.grad_accum_steps, config.batch_size, config.seq_len)]
    }
    eval_batch = {
        key: jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
        for key, value in abstract_batch.items()
    }
    with setup.activate():
        lowered = (
            setup.p_init.lower(),
            setup.p_train_step.lower(setup.abstract_state, abstract_batch),
            setup.p_eval_step.lower(setup.abstract_state.params, eval_batch),
        )
    for step in lowered:
        with pytest.raises(Exception, match="xla_no_such_option"):
            step.compile()


def test_cpu_options_keep_the_steps_numerics(monkeypatch: pytest.MonkeyPatch) -> None:
    """A train step and an eval step agree with the same steps at XLA's default level (2,
    given explicitly: the suite itself compiles at level 0, tests/conftest.py)."""
    config = tiny_train_config()
    batches = [_local_batch(config, seed) for seed in range(2)]

    def run(setup) -> tuple[object, ...]:
        state, metrics = setup.train_step(setup.init_state(), batches[0])
        return jax.device_get((state.params, metrics, setup.eval_step(state.params, batches[1])))

    requested = []
    real_options = training_setup.compiler_options

    def recording(platform: str):
        requested.append(platform)
        return real_options(platform)

    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(training_setup, "compiler_options", recording)
    tuned = run(setup_training(config))
    assert requested == ["cpu"] and real_options("cpu") == CPU_OPTIONS
    assert CPU_OPTIONS["xla_backend_optimization_level"] != 2  # tuned differs from default
    default_level = {"xla_backend_optimization_level": 2}
    monkeypatch.setattr(training_setup, "compiler_options", lambda platform: default_level)
    default = run(setup_training(config))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), tuned, default
    )


def test_a_level_in_xla_flags_overrides_the_cpu_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert compiler_options("cpu") == CPU_OPTIONS
    assert compiler_options("cpu") is not compiler_options("cpu")  # a fresh dict each call
    assert compiler_options("gpu") is None and compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert compiler_options("cpu") is None
