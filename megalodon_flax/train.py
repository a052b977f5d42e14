"""Training and evaluation of the Megalodon LM on enwik8 bytes.

The shape follows the Flax examples: `create_train_state`, `train_step`, `eval_step`,
`evaluate` and `train_and_evaluate(config, workdir)`. Steps are `jax.jit`ed with explicit
in/out shardings derived from the mesh and the logical axis rules, the train state is
donated, and gradient accumulation runs inside the compiled step (`lax.scan` over
micro-batches).

Batches fed to `train_step` hold `(A, B, L)` arrays: `A = grad_accum_steps` micro-batches of
`B = batch_size` rows. Global row `r` of a step's `A * B` rows is row `r // A` of micro-batch
`r % A`, so every process's contiguous block of rows is a contiguous block of every
micro-batch, and the grouping does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding

from megalodon_flax import (
    checkpointing,
    evaluation,
    input_pipeline,
    losses,
    models,
    sharding,
)
from megalodon_flax import metrics as metrics_lib
from megalodon_flax.config import ConfigError
from megalodon_flax.memory import peak_memory_mib
from megalodon_flax.model import count_params

Batch = Mapping[str, Any]

# ------------------------------------------------------------------------------ config checks
_LR_SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


def _ge(low: float) -> Callable[[Any], bool]:
    return lambda v: v >= low


def _in(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v in allowed


# name -> (type, check, description of the check)
_FIELDS: dict[str, tuple[str, Callable[[Any], bool] | None, str]] = {
    "model_family": ("str", _in(*models.FAMILIES), f"one of {models.FAMILIES}"),
    "model": ("dict", None, ""),
    "seed": ("int", _ge(0), ">= 0"),
    "seq_len": ("int", _ge(2), ">= 2"),
    "batch_size": ("int", _ge(1), ">= 1"),
    "grad_accum_steps": ("int", _ge(1), ">= 1"),
    "num_train_steps": ("int", _ge(1), ">= 1"),
    "learning_rate": ("float", lambda v: v > 0 and math.isfinite(v), "> 0"),
    "lr_schedule": ("str", _in(*_LR_SCHEDULES), f"one of {_LR_SCHEDULES}"),
    "warmup_steps": ("int", _ge(0), ">= 0"),
    "min_lr_ratio": ("float", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "adam_b1": ("float", lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_b2": ("float", lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_eps": ("float", _ge(0), ">= 0"),
    "weight_decay": ("float", _ge(0), ">= 0"),
    "weight_decay_mask": ("str", _in("all", "matrices"), "'all' or 'matrices'"),
    "grad_clip_norm": ("float", _ge(0), ">= 0 (0 disables clipping)"),
    "log_every_steps": ("int", _ge(1), ">= 1"),
    "eval_every_steps": ("int", _ge(1), ">= 1"),
    "num_eval_batches": ("int", lambda v: v == -1 or v >= 1, "-1 or >= 1"),
    "eval_batch_size": ("int", _ge(1), ">= 1"),
    "checkpoint_every_steps": ("int", _ge(1), ">= 1"),
    "max_checkpoints_to_keep": ("int", _ge(1), ">= 1"),
    "async_checkpointing": ("bool", None, ""),
    "report_every_secs": ("float", lambda v: v > 0, "> 0"),
    "sample_every_steps": ("int", _ge(0), ">= 0 (0 disables sampling)"),
    "sample_prompt": ("str", lambda v: len(v) > 0, "non-empty"),
    "sample_length": ("int", _ge(1), ">= 1"),
    "sample_temperature": ("float", _ge(0), ">= 0"),
    "sample_top_k": ("int", _ge(0), ">= 0"),
    "sample_top_p": ("float", lambda v: 0 < v <= 1, "in (0, 1]"),
    "profile_num_steps": ("int", _ge(0), ">= 0 (0 disables profiling)"),
    "profile_first_step": ("int", _ge(0), ">= 0"),
    "mesh_shape": ("ints", None, ""),
    "logical_axis_rules": ("rules", None, ""),
    "data_dir": ("optional_str", None, ""),
    "manual_dir": ("optional_str", None, ""),
    "allow_sample_fallback": ("bool", None, ""),
    "eval_split": ("str", _in("validation", "test"), "'validation' or 'test'"),
    "eval_mode": ("str", _in("window", "stream", "both"), "'window', 'stream' or 'both'"),
    "eval_stream_max_bytes": ("int", lambda v: v == -1 or v >= 2, "-1 or >= 2"),
    "eval_stream_num_streams": ("int", _ge(1), ">= 1"),
}

# Fields that configs written before they existed may lack.
_DEFAULTS: dict[str, Any] = {"model_family": models.DEFAULT_FAMILY}


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "int":
        return isinstance(value, int | np.integer) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
            value, bool
        )
    if kind == "bool":
        return isinstance(value, bool | np.bool_)
    if kind == "str":
        return isinstance(value, str)
    if kind == "optional_str":
        return value is None or isinstance(value, str)
    if kind == "dict":
        return isinstance(value, Mapping | ml_collections.ConfigDict)
    if kind == "ints":
        return isinstance(value, tuple | list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    return True


def validate_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
    """Checks every field of a training config before any work starts.

    Args:
        config: A config like `configs/megalodon.py:get_config()`.

    Returns:
        The model config built from `config.model`.

    Raises:
        ConfigError: Naming the first unknown, missing or invalid field.
    """
    keys = set(config.keys()) | set(_DEFAULTS)
    unknown = sorted(keys - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config keys: {unknown}")
    missing = sorted(set(_FIELDS) - keys)
    if missing:
        raise ConfigError(f"config is missing keys: {missing}")
    for name, (kind, check, rule) in _FIELDS.items():
        value = config.get(name, _DEFAULTS.get(name))
        if not _type_ok(kind, value):
            raise ConfigError(
                f"config.{name} has the wrong type: expected {kind}, got "
                f"{type(value).__name__} {value!r}"
            )
        if check is not None and not check(value):
            raise ConfigError(f"config.{name} must be {rule}, got {value!r}")
    if len(config.mesh_shape) != len(sharding.MESH_AXES):
        raise ConfigError(
            f"config.mesh_shape must give {len(sharding.MESH_AXES)} sizes for the axes "
            f"{sharding.MESH_AXES}, got {tuple(config.mesh_shape)}"
        )
    try:
        sharding.validate_rules(config.logical_axis_rules)
    except sharding.MeshError as err:
        raise ConfigError(f"config.logical_axis_rules: {err}") from err
    family = models.family_of(config)
    try:
        model_config = models.model_config_from(config, family)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"config.model: {err}") from err
    if model_config.vocab_size < 256 or model_config.output_width < 256:
        raise ConfigError(
            f"config.model.vocab_size and the output width must be >= 256 for byte-level "
            f"data, got {model_config.vocab_size} and {model_config.output_width}"
        )
    if config.eval_mode != "window" and family not in models.CARRIED_STATE_FAMILIES:
        raise ConfigError(
            f"config.eval_mode={config.eval_mode!r} needs a model with carried state (model "
            f"families {sorted(models.CARRIED_STATE_FAMILIES)}); the {family!r} family "
            "supports only 'window'"
        )
    return model_config


def validate_workdir(workdir: epath.PathLike) -> epath.Path:
    """Returns `workdir` as a path; raises ValueError if it exists and is not a directory."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir {path} exists and is not a directory.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"workdir {path}: {parent} is a file, not a directory.")
            break
    return path


def create_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh of `config.mesh_shape`.

    Raises:
        ConfigError: If the mesh does not fit the devices or the batch sizes do not split
            over the data axes.
    """
    try:
        mesh = sharding.make_mesh(config.mesh_shape, sharding.MESH_AXES)
    except sharding.MeshError as err:
        raise ConfigError(f"config.mesh_shape: {err}") from err
    rules = tuple(config.logical_axis_rules)
    shards = sharding.batch_shards(mesh, rules)
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % shards:
            raise ConfigError(
                f"config.{name}={config[name]} is not divisible by the {shards} data-parallel "
                f"shards of the mesh {dict(mesh.shape)} (the 'batch' axis maps to "
                f"{nn.logical_to_mesh_axes(('batch',), rules)[0]})"
            )
        if config[name] % jax.process_count():
            raise ConfigError(
                f"config.{name}={config[name]} is not divisible by the {jax.process_count()} "
                "processes"
            )
    if config.eval_mode != "window" and jax.process_count() > 1:
        raise ConfigError(
            f"config.eval_mode={config.eval_mode!r} (stream evaluation) runs in a single "
            "process; use 'window' for multi-process runs"
        )
    return mesh


# ------------------------------------------------------------------------- model, optimizer
class TrainState(train_state.TrainState):
    """Flax TrainState plus the RNG key (raw uint32 key data) split every step."""

    rng: jax.Array


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Returns `step -> learning rate` for the step about to be taken (step 0 first).

    Linear warmup `peak * (step + 1) / warmup_steps` for `step < warmup_steps`, then
    `cosine` / `linear` decay to `peak * min_lr_ratio` at `num_train_steps`, `rsqrt`
    (`peak * sqrt(warmup / (step + 1))`) or `constant`.
    """
    peak = float(config.learning_rate)
    warmup = int(config.warmup_steps)
    total = int(config.num_train_steps)
    floor = float(config.min_lr_ratio)
    kind = config.lr_schedule
    if kind not in _LR_SCHEDULES:
        raise ConfigError(f"config.lr_schedule must be one of {_LR_SCHEDULES}, got {kind!r}")

    def schedule(step: jax.Array | int) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (s + 1.0) / warmup) if warmup > 0 else jnp.float32(1.0)
        progress = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if kind == "cosine":
            decay = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif kind == "linear":
            decay = 1.0 - (1.0 - floor) * progress
        elif kind == "rsqrt":
            decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(s + 1.0, max(warmup, 1)))
        else:
            decay = jnp.float32(1.0)
        return jnp.where(s < warmup, peak * warm, peak * decay).astype(jnp.float32)

    return schedule


def _matrix_mask(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay, after clipping to `grad_clip_norm` (if > 0)."""
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_fn,
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=None if config.weight_decay_mask == "all" else _matrix_mask,
        )
    )
    return optax.chain(*parts)


def create_train_state(
    rng: jax.Array, model: models.LanguageModel, tx: optax.GradientTransformation
) -> TrainState:
    """Initializes parameters (boxed with logical axis names) and the optimizer state.

    Pure: meant for `jax.eval_shape` and `jax.jit` (unbox the result inside jit).

    Args:
        rng: PRNG key.
        model: The language model.
        tx: The optimizer.

    Returns:
        A TrainState at step 0 whose `rng` is the key for dropout and later randomness.
    """
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        rng=jax.random.key_data(state_rng) if _is_typed_key(state_rng) else state_rng,
    )


def _is_typed_key(key: jax.Array) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _uses_dropout(model_config: models.ModelConfig) -> bool:
    return any(
        getattr(model_config, name, 0.0) > 0
        for name in ("dropout", "attention_dropout", "hidden_dropout")
    )


# ---------------------------------------------------------------------------------- steps
def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: models.LanguageModel,
    learning_rate_fn: optax.Schedule,
    dropout: bool = False,
) -> tuple[TrainState, metrics_lib.TrainMetrics]:
    """One optimizer update from `A` accumulated micro-batches.

    The loss is the weighted mean over all `A * B * L` target bytes, so the update equals the
    one from a single batch of `A * B` rows (up to float rounding).

    Args:
        state: The train state.
        batch: `inputs`, `targets` int32 `(A, B, L)` and `weights` float32 `(A, B, L)`.
        model: The language model.
        learning_rate_fn: The schedule (for the logged learning rate).
        dropout: Run the model in training mode with dropout.

    Returns:
        The new state and the step's `TrainMetrics`.
    """
    weights = batch["weights"].astype(jnp.float32)
    num_micro = batch["inputs"].shape[0]
    total_weight = jnp.maximum(weights.sum(), 1.0)
    next_rng, step_rng = jax.random.split(state.rng)

    def loss_fn(params: Any, micro: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, _ = model.apply(
            {"params": params},
            micro["inputs"],
            deterministic=not dropout,
            rngs={"dropout": rng} if dropout else None,
        )
        loss_sum, _, per_token = losses.weighted_loss_sum(
            logits, micro["targets"], micro["weights"]
        )
        return loss_sum / total_weight, per_token

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        micro = jax.tree.map(lambda x: x[0], dict(batch))
        (loss, per_token), grads = grad_fn(state.params, micro, jax.random.fold_in(step_rng, 0))
        per_token = per_token[None]
    else:

        def body(carry: Any, xs: Any) -> tuple[Any, jax.Array]:
            grad_sum, loss_sum = carry
            micro, index = xs
            (loss, per_token), grads = grad_fn(
                state.params, micro, jax.random.fold_in(step_rng, index)
            )
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), per_token

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss), per_token = jax.lax.scan(
            body, (zeros, jnp.float32(0.0)), (dict(batch), jnp.arange(num_micro))
        )
    grad_norm = optax.global_norm(grads)
    new_state = state.apply_gradients(grads=grads, rng=next_rng)
    step_metrics = metrics_lib.TrainMetrics.single_from_model_output(
        loss=per_token,
        token_mask=weights > 0,
        step_loss=loss,
        grad_norm=grad_norm,
        learning_rate=learning_rate_fn(state.step),
    )
    return new_state, step_metrics


def eval_step(params: Any, batch: Batch, *, model: models.LanguageModel) -> metrics_lib.EvalMetrics:
    """Per-token losses of one evaluation batch (`(B, L)` arrays; weight 0 = padding)."""
    logits, _ = model.apply({"params": params}, batch["inputs"], deterministic=True)
    _, _, per_token = losses.weighted_loss_sum(logits, batch["targets"], batch["weights"])
    return metrics_lib.EvalMetrics.single_from_model_output(
        loss=per_token, token_mask=batch["weights"] > 0
    )


def evaluate(
    eval_step_fn: Callable[[Any, Batch], metrics_lib.EvalMetrics],
    params: Any,
    batches: Iterable[Batch],
) -> dict[str, float]:
    """Runs `eval_step_fn` over `batches` and returns the token-averaged metrics.

    Returns:
        `{'loss': nats per byte, 'bits_per_byte': ...}` over all non-padded targets.
    """
    total = None
    for batch in batches:
        step_metrics = eval_step_fn(params, batch)
        total = step_metrics if total is None else total.merge(step_metrics)
    if total is None:
        raise ValueError("evaluation got no batches")
    return {k: float(v) for k, v in jax.device_get(total.compute()).items()}


# --------------------------------------------------------------------------- compiled setup
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
        p_init: Jitted `() -> TrainState`, laid out by `state_shardings`.
        p_train_step: Jitted `(state, global batch) -> (state, metrics)`; donates the state.
        p_eval_step: Jitted `(params, global batch) -> metrics`.
    """

    config: ml_collections.ConfigDict
    model_config: models.ModelConfig
    model: models.LanguageModel
    mesh: Mesh
    rules: sharding.LogicalRules
    learning_rate_fn: optax.Schedule
    tx: optax.GradientTransformation
    state_shardings: Any
    abstract_state: Any
    train_batch_sharding: NamedSharding
    eval_batch_sharding: NamedSharding
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
        """Turns this process's `(A * b, L)` rows into the global `(A, B, L)` arrays."""
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
        """Turns this process's `(b, L)` rows into the global `(B, L)` arrays."""
        return sharding.to_global_batch(
            local_batch, self.eval_batch_sharding, self.config.eval_batch_size, axis=0
        )

    def train_step(self, state: TrainState, local_batch: Batch) -> tuple[TrainState, Any]:
        """Runs the compiled step on this process's rows (see `global_train_batch`)."""
        batch = self.global_train_batch(local_batch)
        with self.activate():
            return self.p_train_step(state, batch)

    def eval_step(self, params: Any, local_batch: Batch) -> metrics_lib.EvalMetrics:
        """Runs the compiled eval step on this process's rows."""
        batch = self.global_eval_batch(local_batch)
        with self.activate():
            return self.p_eval_step(params, batch)


def setup_training(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> TrainingSetup:
    """Validates `config` and builds the model, optimizer, shardings and jitted steps.

    Nothing is compiled here: compilation happens at the first call of each step.

    Args:
        config: The training config.
        mesh: The mesh; built from `config.mesh_shape` when None.

    Returns:
        A TrainingSetup.

    Raises:
        ConfigError: On an invalid config or a mesh that does not fit.
    """
    model_config = validate_config(config)
    if mesh is None:
        mesh = create_mesh(config)
    rules = sharding.validate_rules(config.logical_axis_rules)
    model = models.build_model(model_config)
    learning_rate_fn = create_learning_rate_fn(config)
    tx = create_optimizer(config, learning_rate_fn)
    seed = int(config.seed)

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
    metrics_sharding = sharding.replicated(mesh)
    p_init = jax.jit(lambda: nn.unbox(init_boxed()), out_shardings=state_shardings)
    p_train_step = jax.jit(
        functools.partial(
            train_step,
            model=model,
            learning_rate_fn=learning_rate_fn,
            dropout=_uses_dropout(model_config),
        ),
        in_shardings=(state_shardings, train_batch_sharding),
        out_shardings=(state_shardings, metrics_sharding),
        donate_argnums=0,
    )
    p_eval_step = jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(state_shardings.params, eval_batch_sharding),
        out_shardings=metrics_sharding,
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
        p_init=p_init,
        p_train_step=p_train_step,
        p_eval_step=p_eval_step,
    )


# ------------------------------------------------------------------------------------ data
def load_data(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Loads the enwik8 splits (uint8 arrays), falling back to the bundled sample if allowed.

    In a multi-process run process 0 prepares the dataset first; the others then read it.
    """
    from megalodon_flax.data import enwik8  # tensorflow_datasets: only when data is needed

    def load() -> dict[str, np.ndarray]:
        data = enwik8.load_enwik8_splits(
            data_dir=config.data_dir,
            manual_dir=config.manual_dir,
            allow_sample_fallback=config.allow_sample_fallback,
        )
        logging.info("Data: %s", data.source)
        return dict(data.splits)

    if jax.process_count() == 1:
        return load()
    from jax.experimental import multihost_utils

    splits = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("enwik8 prepared")
    return splits if splits is not None else load()


def eval_batches(
    config: ml_collections.ConfigDict, data: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    """This process's evaluation batches of `config.eval_batch_size` global rows."""
    return input_pipeline.eval_batches(
        data,
        seq_len=config.seq_len,
        global_batch_size=config.eval_batch_size,
        max_batches=None if config.num_eval_batches == -1 else config.num_eval_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


# -------------------------------------------------------------------------------- sampling
def generate_sample(setup: TrainingSetup, params: Any, step: int) -> str:
    """Generates `config.sample_length` bytes after `config.sample_prompt` with `params`.

    The sampling key depends only on `config.seed` and `step`.

    Returns:
        The prompt followed by the generated bytes, decoded as UTF-8 (invalid bytes replaced).
    """
    from jax.experimental import multihost_utils

    from megalodon_flax import inference

    config = setup.config
    prompt_bytes = config.sample_prompt.encode("utf-8")
    prompt = np.frombuffer(prompt_bytes, np.uint8).astype(np.int32)[None]
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
    with setup.activate():
        tokens = inference.generate(
            setup.model,
            params,
            prompt,
            config.sample_length,
            rng,
            temperature=config.sample_temperature,
            top_k=config.sample_top_k,
            top_p=config.sample_top_p,
        )
    tokens = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
    generated = bytes(np.clip(tokens[0], 0, 255).astype(np.uint8).tolist())
    return (prompt_bytes + generated).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- main loop
def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    out = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    visit("", config.to_dict())
    return out


def _log_parameter_overview(setup: TrainingSetup, params: Any) -> int:
    """Logs the parameter tree and totals; returns the number of parameters."""
    from clu import parameter_overview

    n = count_params(params)
    expected = models.closed_form_parameter_count(setup.model_config)
    parameter_overview.log_parameter_overview(
        params, include_stats=jax.process_count() == 1, msg="Parameters"
    )
    logging.info(
        "Model: %s parameters (closed form %s); mesh %s; compute dtype %s",
        f"{n:,}",
        f"{expected:,}",
        dict(setup.mesh.shape),
        setup.model_config.compute_dtype,
    )
    return n


def _run_metadata(setup: TrainingSetup) -> dict[str, Any]:
    return {"model": setup.model_config.to_dict(), "seq_len": setup.config.seq_len}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> TrainState:
    """Trains on enwik8 with periodic evaluation, sampling and checkpoints; resumes if possible.

    Rerunning with the same `workdir` continues from its newest checkpoint (state, RNG and
    input position), so an interrupted run reproduces the uninterrupted one.

    Args:
        config: A config like `configs/megalodon.py:get_config()`.
        workdir: Directory for checkpoints, TensorBoard event files and `config.json`.

    Returns:
        The final train state.

    Raises:
        ConfigError: On an invalid config or mesh, before any work.
        ValueError: If `workdir` is a file.
        checkpointing.CheckpointError: If the newest checkpoint is damaged or from another model.
    """
    validate_config(config)
    workdir = validate_workdir(workdir)
    mesh = create_mesh(config)
    checkpointing.quiet_orbax_logs()
    setup = setup_training(config, mesh)

    from clu import metric_writers, periodic_actions  # import TensorFlow: start-up only

    is_chief = jax.process_index() == 0
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("workdir created")
    config_path = checkpointing.save_config(config, workdir)
    logging.info("Config saved to %s", config_path)

    splits = load_data(config)
    train_data, eval_data = splits["train"], splits[config.eval_split]

    manager = checkpointing.create_manager(
        workdir,
        max_to_keep=config.max_checkpoints_to_keep,
        async_save=config.async_checkpointing,
    )
    meta = _run_metadata(setup)
    restored = checkpointing.restore_latest(manager, setup.abstract_state, meta)
    if restored is None:
        state = setup.init_state()
        iterator_state = None
        logging.info("Starting from scratch in %s", workdir)
    else:
        ckpt_step, state, data_state = restored
        iterator_state = data_state["train_iterator"]
        logging.info("Resuming at step %d from %s", ckpt_step, manager.directory)
    initial_step = int(jax.device_get(state.step))
    num_steps = config.num_train_steps
    effective_batch = config.batch_size * config.grad_accum_steps

    train_iter = input_pipeline.TrainIterator(
        train_data,
        seq_len=config.seq_len,
        global_batch_size=effective_batch,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        state=iterator_state,
    )

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if initial_step == 0:
        writer.write_hparams(_flat_hparams(config))
    num_params = _log_parameter_overview(setup, state.params)
    writer.write_scalars(initial_step, {"num_params": num_params})

    hooks = []
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer, every_secs=config.report_every_secs
    )
    if is_chief:
        hooks.append(report_progress)
        if config.profile_num_steps > 0:
            hooks.append(
                periodic_actions.Profile(
                    logdir=workdir,
                    num_profile_steps=config.profile_num_steps,
                    profile_duration_ms=None,
                    first_profile=config.profile_first_step,
                    every_secs=None,
                )
            )

    def save_checkpoint(step: int) -> None:
        with report_progress.timed("checkpoint"):
            checkpointing.save(
                manager,
                step,
                state,
                {"step": step, "train_iterator": train_iter.get_state()},
                meta,
            )

    def run_eval(step: int) -> None:
        scalars = {}
        if config.eval_mode in ("window", "both"):
            with report_progress.timed("eval"):
                results = evaluate(setup.eval_step, state.params, eval_batches(config, eval_data))
            scalars.update({f"eval_{k}": v for k, v in results.items()})
        if config.eval_mode in ("stream", "both"):
            with report_progress.timed("eval_stream"):
                stream = evaluation.stream_eval(
                    setup.model,
                    state.params,
                    eval_data,
                    num_streams=config.eval_stream_num_streams,
                    max_bytes=None
                    if config.eval_stream_max_bytes == -1
                    else config.eval_stream_max_bytes,
                )
            scalars.update(
                eval_stream_loss=stream.loss, eval_stream_bits_per_byte=stream.bits_per_byte
            )
        writer.write_scalars(step, scalars)

    def run_sample(step: int) -> None:
        with report_progress.timed("sample"):
            text = generate_sample(setup, state.params, step)
        writer.write_texts(step, {"sample": text})

    tokens_per_step = effective_batch * config.seq_len
    train_metrics = None
    last_log_time, last_log_step, paused = time.perf_counter(), initial_step, 0.0
    if initial_step >= num_steps:
        logging.info("Nothing to do: step %d >= num_train_steps %d", initial_step, num_steps)
    else:
        logging.info("Training from step %d to %d", initial_step, num_steps)
    with contextlib.ExitStack() as stack:
        # Close the checkpoint manager (waiting for a pending save) even if training fails.
        stack.callback(manager.close)
        stack.callback(manager.wait_until_finished)
        stack.enter_context(metric_writers.ensure_flushes(writer))
        for step in range(initial_step + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(train_iter)
                state, step_metrics = setup.train_step(state, batch)
                train_metrics = (
                    step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
                )
            for hook in hooks:
                hook(step)
            is_last = step == num_steps
            if step % config.log_every_steps == 0 or is_last:
                scalars = jax.device_get(train_metrics.compute())
                now = time.perf_counter()
                elapsed = max(now - last_log_time - paused, 1e-9)
                summary = {f"train_{k}": float(v) for k, v in scalars.items()}
                summary["learning_rate"] = summary.pop("train_learning_rate")
                summary["grad_norm"] = summary.pop("train_grad_norm")
                summary["tokens_per_sec"] = (step - last_log_step) * tokens_per_step / elapsed
                summary["seconds_per_step"] = elapsed / (step - last_log_step)
                summary["peak_memory_mb"] = peak_memory_mib()
                writer.write_scalars(step, summary)
                train_metrics = None
                last_log_time, last_log_step, paused = now, step, 0.0
            t0 = time.perf_counter()
            if step % config.eval_every_steps == 0 or is_last:
                run_eval(step)
            if config.sample_every_steps and (step % config.sample_every_steps == 0 or is_last):
                run_sample(step)
            if step % config.checkpoint_every_steps == 0 or is_last:
                save_checkpoint(step)
            paused += time.perf_counter() - t0
    logging.info("Finished at step %d; checkpoints in %s", num_steps, manager.directory)
    return state
