"""The train state and the pure step functions (jitted and sharded by `training.setup`).

Batches fed to `train_step` hold `(A, B, L)` arrays: `A = grad_accum_steps` micro-batches of
`B = batch_size` rows; gradient accumulation runs inside the compiled step (`lax.scan` over
micro-batches). Every step reports whether its loss, its gradient norm and its updated
parameters are finite; with `skip_nonfinite` (`config.nan_policy='skip'`) a step where any of
them is not keeps the previous parameters and optimizer moments: the update is not applied.
The step counters (the state's and the optimizer's, which place the learning-rate schedule)
and the RNG still advance, so the schedule, the data position and the checkpoint numbering
stay those of the step.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from megalodon_flax import families
from megalodon_flax.training import metrics as metrics_lib

Batch = Mapping[str, Any]


class TrainState(train_state.TrainState):
    """Flax TrainState plus the RNG key (raw uint32 key data) split every step."""

    rng: jax.Array


def create_train_state(
    rng: jax.Array, model: families.LanguageModel, tx: optax.GradientTransformation
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


def uses_dropout(model_config: families.ModelConfig) -> bool:
    """Whether any dropout rate of the model config is positive (train steps need an RNG)."""
    return any(
        getattr(model_config, name, 0.0) > 0
        for name in ("dropout", "attention_dropout", "hidden_dropout")
    )


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: families.LanguageModel,
    learning_rate_fn: optax.Schedule,
    dropout: bool = False,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, metrics_lib.TrainMetrics]:
    """One optimizer update from `A` accumulated micro-batches.

    The loss is the weighted mean over all `A * B * L` target bytes, so the update equals the
    one from a single batch of `A * B` rows (up to float rounding).

    Args:
        state: The train state.
        batch: `inputs`, `targets` int32 `(A, B, L)` and `weights` float32 `(A, B, L)`, and
            for packed rows `segment_ids` int32 `(A, B, L)` of the inputs (the weights then
            drop padding targets and the pairs that straddle two runs).
        model: The language model.
        learning_rate_fn: The schedule (for the logged learning rate).
        dropout: Run the model in training mode with dropout.
        skip_nonfinite: Do not apply an update whose loss, gradient norm or new parameters
            are not finite (the metrics count it in `skipped_updates`).

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
            segment_ids=micro.get("segment_ids"),
            deterministic=not dropout,
            rngs={"dropout": rng} if dropout else None,
        )
        loss_sum, _, per_token = metrics_lib.weighted_loss_sum(
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
    loss_ok, norm_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    # The new parameters; the optimizer moments are finite whenever the gradient norm is (AdamW
    # sums squares of gradients whose squares the norm already summed), and a save checks the
    # whole state again.
    update_ok = _all_finite(new_state.params)
    ok = loss_ok & norm_ok & update_ok
    skipped = jnp.logical_not(ok) if skip_nonfinite else jnp.bool_(False)
    if skip_nonfinite:
        new_state = new_state.replace(
            params=jax.tree.map(functools.partial(_unless_bad, ok), new_state.params, state.params),
            opt_state=jax.tree.map(
                functools.partial(_unless_bad, ok), new_state.opt_state, state.opt_state
            ),
        )
    step_metrics = metrics_lib.TrainMetrics.single_from_model_output(
        loss=per_token,
        token_mask=weights > 0,
        step_loss=loss,
        grad_norm=grad_norm,
        learning_rate=learning_rate_fn(state.step),
        nonfinite_loss=jnp.logical_not(loss_ok),
        nonfinite_grad_norm=jnp.logical_not(norm_ok),
        nonfinite_update=jnp.logical_not(update_ok),
        skipped=skipped,
    )
    return new_state, step_metrics


def _unless_bad(ok: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` if the step is finite, else `old`; integer leaves (the optimizer's step counts,
    which place the learning-rate schedule) always advance, like `TrainState.step`."""
    if not jnp.issubdtype(new.dtype, jnp.inexact):
        return new
    return jnp.where(ok, new, old)


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value of `tree` is finite (a scalar bool)."""
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def eval_step(
    params: Any, batch: Batch, *, model: families.LanguageModel
) -> metrics_lib.EvalMetrics:
    """Per-token losses of one evaluation batch (`(B, L)` arrays; weight 0 = padding;
    `segment_ids` for packed rows)."""
    logits, _ = model.apply(
        {"params": params},
        batch["inputs"],
        segment_ids=batch.get("segment_ids"),
        deterministic=True,
    )
    _, _, per_token = metrics_lib.weighted_loss_sum(logits, batch["targets"], batch["weights"])
    return metrics_lib.EvalMetrics.single_from_model_output(
        loss=per_token, token_mask=batch["weights"] > 0
    )
