"""Everything a training config compiles to: mesh, model, optimizer, shardings, jitted steps.

Steps are `jax.jit`ed with explicit in/out shardings derived from the mesh and the logical
axis rules, and the train state is donated; they and the state's initialiser compile with
the platform's `compiler_options`. Global row `r` of a step's `A * B` rows is row `r // A`
of micro-batch `r % A`, so every process's contiguous block of rows is a contiguous
block of every micro-batch, and the grouping does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from megalodon_flax import families, sharding
from megalodon_flax.compiler_options import compiler_options, mesh_platform
from megalodon_flax.config_base import ConfigError
from megalodon_flax.training.config import TrainConfig
from megalodon_flax.training.metrics import EvalMetrics
from megalodon_flax.training.optimizer import create_learning_rate_fn, create_optimizer
from megalodon_flax.training.steps import (
    Batch,
    TrainState,
    create_train_state,
    eval_step,
    train_step,
    uses_dropout,
)


def create_mesh(config: TrainConfig) -> Mesh:
    """Builds the (data, fsdp, tensor, context) mesh of `config.mesh.shape`.

    Raises:
        ConfigError: If the mesh does not fit the devices, the batch sizes do not split over
            the data axes, or the context axis cannot split the sequences.
    """
    try:
        mesh = sharding.make_mesh(config.mesh.shape, sharding.MESH_AXES)
    except sharding.MeshError as err:
        raise ConfigError(
            f"config.mesh.shape {tuple(config.mesh.shape)} (axes {sharding.MESH_AXES}): {err}"
        ) from None
    rules = config.mesh.logical_axis_rules
    _check_context_split(config, mesh.shape[sharding.CONTEXT_AXIS])
    shards = sharding.batch_shards(mesh, rules)
    for name, size in (
        ("batch_size", config.batch_size),
        ("eval.batch_size", config.eval.batch_size),
    ):
        if size % shards:
            raise ConfigError(
                f"config.{name}={size} is not divisible by the {shards} data-parallel "
                f"shards of the mesh {dict(mesh.shape)} (the 'batch' axis maps to "
                f"{nn.logical_to_mesh_axes(('batch',), rules)[0]})"
            )
    if config.eval.mode != "window" and jax.process_count() > 1:
        raise ConfigError(
            f"config.eval.mode={config.eval.mode!r} (stream evaluation) runs in a single "
            "process; use 'window' for multi-process runs"
        )
    return mesh


def _check_context_split(config: TrainConfig, size: int) -> None:
    """Refuses a context axis of `size` > 1 that cannot split the run's sequences."""
    if size == 1:
        return
    where = f"config.mesh.shape gives the context axis {size} devices"
    model = config.model
    chunk = getattr(model, "chunk_size", None)
    if chunk is None:
        raise ConfigError(
            f"{where}, but model_family {config.model_family!r} has no chunk structure to "
            "split a sequence along (context parallelism needs Megalodon's chunked attention "
            "and streaming state); use a context size of 1"
        )
    if model.timestep_norm_variant != "upstream":
        raise ConfigError(
            f"{where}, but context parallelism needs config.model.timestep_norm_variant="
            f"'upstream', got {model.timestep_norm_variant!r}"
        )
    if config.seq_len % (size * chunk):
        raise ConfigError(
            f"{where}: config.seq_len={config.seq_len} must be divisible by the context size "
            f"× config.model.chunk_size = {size} × {chunk} = {size * chunk} (every shard holds "
            "whole chunks)"
        )
    targets = nn.logical_to_mesh_axes(("length",), config.mesh.logical_axis_rules)[0]
    if targets != sharding.CONTEXT_AXIS and tuple(targets or ()) != (sharding.CONTEXT_AXIS,):
        raise ConfigError(
            f"{where}, but config.mesh.logical_axis_rules maps 'length' to {targets!r}; map "
            f"it to {sharding.CONTEXT_AXIS!r} (the default rules do)"
        )


@dataclasses.dataclass
class TrainingSetup:
    """Everything derived from a config and a mesh: model, optimizer, shardings, jitted steps.

    Attributes:
        config: The training config.
        model_config: The validated model config.
        model: The language model.
        mesh: The device mesh.
        rules: Logical axis rules.
        learning_rate_fn: The schedule.
        tx: The optimizer.
        state_shardings: NamedSharding per leaf of the (unboxed) train state.
        abstract_state: The train state as `jax.ShapeDtypeStruct`s carrying those shardings.
        train_batch_sharding: Sharding of `(A, B, L)` train arrays.
        eval_batch_sharding: Sharding of `(B, L)` eval arrays.
        train_rows: `(index, count)`: this process loads row block `index` of `count` of
            every global train batch (`sharding.process_rows`).
        eval_rows: The same for eval batches.
        p_init: Jitted `() -> TrainState`, laid out by `state_shardings`.
        p_train_step: Jitted `(state, global batch) -> (state, metrics)`; donates the state.
        p_eval_step: Jitted `(params, global batch) -> metrics`.
    """

    config: TrainConfig
    model_config: families.ModelConfig
    model: families.LanguageModel
    mesh: Mesh
    rules: sharding.LogicalRules
    learning_rate_fn: optax.Schedule
    tx: optax.GradientTransformation
    state_shardings: Any
    abstract_state: Any
    train_batch_sharding: NamedSharding
    eval_batch_sharding: NamedSharding
    train_rows: tuple[int, int]
    eval_rows: tuple[int, int]
    p_init: Callable[[], TrainState]
    p_train_step: Any
    p_eval_step: Any

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Context in which the mesh and the logical axis rules are active."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def init_state(self) -> TrainState:
        """A fresh train state, sharded over the mesh."""
        with self.activate():
            return self.p_init()

    def global_train_batch(self, local_batch: Batch) -> dict[str, jax.Array]:
        """Turns this process's `(A * b, L)` rows (block `train_rows`) into the global
        `(A, B, L)` arrays."""
        accum = self.config.grad_accum_steps
        local = {}
        for key, value in local_batch.items():
            rows = value.shape[0]
            if rows % accum:
                raise ValueError(f"{rows} local rows do not split into {accum} micro-batches")
            value = value.reshape(rows // accum, accum, *value.shape[1:])
            local[key] = np.ascontiguousarray(np.swapaxes(value, 0, 1))
        return sharding.to_global_batch(
            local, self.train_batch_sharding, self.config.batch_size, axis=1
        )

    def global_eval_batch(self, local_batch: Batch) -> dict[str, jax.Array]:
        """Turns this process's `(b, L)` rows (block `eval_rows`) into the global `(B, L)`
        arrays."""
        return sharding.to_global_batch(
            local_batch, self.eval_batch_sharding, self.config.eval.batch_size, axis=0
        )

    def train_step(self, state: TrainState, local_batch: Batch) -> tuple[TrainState, Any]:
        """Runs the compiled step on this process's rows (see `global_train_batch`)."""
        batch = self.global_train_batch(local_batch)
        with self.activate():
            return self.p_train_step(state, batch)

    def eval_step(self, params: Any, local_batch: Batch) -> EvalMetrics:
        """Runs the compiled eval step on this process's rows."""
        batch = self.global_eval_batch(local_batch)
        with self.activate():
            return self.p_eval_step(params, batch)


def setup_training(config: TrainConfig, mesh: Mesh | None = None) -> TrainingSetup:
    """Validates `config` and builds the model, optimizer, shardings and jitted steps.

    Nothing is compiled here: compilation happens at the first call of each step.

    Args:
        config: The validated training config.
        mesh: The mesh; built from `config.mesh.shape` when None.

    Returns:
        A TrainingSetup.

    Raises:
        ConfigError: On a mesh that does not fit the devices or the batch sizes.
    """
    model_config = config.model
    if mesh is None:
        mesh = create_mesh(config)
    rules = config.mesh.logical_axis_rules
    model = families.build_model(model_config)
    learning_rate_fn = create_learning_rate_fn(config)
    tx = create_optimizer(config.optimizer, learning_rate_fn)
    seed = config.seed

    def init_boxed() -> TrainState:
        return create_train_state(jax.random.PRNGKey(seed), model, tx)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_boxed)
        state_shardings = sharding.state_shardings(boxed, mesh, rules)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed),
        state_shardings,
    )
    train_batch_sharding = sharding.logical_sharding(mesh, rules, (None, "batch", "length"))
    eval_batch_sharding = sharding.logical_sharding(mesh, rules, ("batch", "length"))
    train_rows = sharding.process_rows(
        train_batch_sharding, (config.grad_accum_steps, config.batch_size, config.seq_len), 1
    )
    eval_rows = sharding.process_rows(
        eval_batch_sharding, (config.eval.batch_size, config.seq_len), 0
    )
    metrics_sharding = sharding.replicated(mesh)
    options = compiler_options(mesh_platform(mesh))
    p_init = jax.jit(
        lambda: nn.unbox(init_boxed()), out_shardings=state_shardings, compiler_options=options
    )
    p_train_step = jax.jit(
        functools.partial(
            train_step,
            model=model,
            learning_rate_fn=learning_rate_fn,
            dropout=uses_dropout(model_config),
            skip_nonfinite=config.nan_policy == "skip",
        ),
        in_shardings=(state_shardings, train_batch_sharding),
        out_shardings=(state_shardings, metrics_sharding),
        donate_argnums=0,
        compiler_options=options,
    )
    p_eval_step = jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(state_shardings.params, eval_batch_sharding),
        out_shardings=metrics_sharding,
        compiler_options=options,
    )
    return TrainingSetup(
        config=config,
        model_config=model_config,
        model=model,
        mesh=mesh,
        rules=rules,
        learning_rate_fn=learning_rate_fn,
        tx=tx,
        state_shardings=state_shardings,
        abstract_state=abstract_state,
        train_batch_sharding=train_batch_sharding,
        eval_batch_sharding=eval_batch_sharding,
        train_rows=train_rows,
        eval_rows=eval_rows,
        p_init=p_init,
        p_train_step=p_train_step,
        p_eval_step=p_eval_step,
    )
