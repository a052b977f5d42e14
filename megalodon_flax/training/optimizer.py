"""The learning-rate schedule and the AdamW chain of a training config."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from megalodon_flax.megalodon import layer_stack
from megalodon_flax.training.config import OptimizerConfig, TrainConfig


def create_learning_rate_fn(config: TrainConfig) -> optax.Schedule:
    """Returns `step -> learning rate` for the step about to be taken (step 0 first).

    Linear warmup `peak * (step + 1) / warmup_steps` for `step < warmup_steps`, then
    `cosine` / `linear` decay to `peak * min_lr_ratio` at `num_train_steps`, `rsqrt`
    (`peak * sqrt(warmup / (step + 1))`) or `constant`.
    """
    peak = config.optimizer.learning_rate
    warmup = config.schedule.warmup_steps
    total = config.num_train_steps
    floor = config.schedule.min_lr_ratio
    kind = config.schedule.kind

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
    """True for weight matrices; a stacked layer axis (scanned layers) does not count."""

    def is_matrix(path: tuple[Any, ...], p: jax.Array) -> bool:
        stacked = any(getattr(key, "key", None) == layer_stack.STACKED_KEY for key in path)
        return p.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def create_optimizer(
    config: OptimizerConfig, learning_rate_fn: optax.Schedule
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
