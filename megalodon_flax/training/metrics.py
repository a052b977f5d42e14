"""Losses and clu metric collections for training and evaluation.

Per-token cross-entropy is float32. Per-token losses come with a boolean `token_mask` (the
weight is positive), so padded positions count neither in the sum nor in the token count.
Training metrics also count the steps whose loss, gradient norm or updated parameters were
not finite; a skipped step (`config.nan_policy='skip'`) counts in none of the averages.
"""

# No `from __future__ import annotations`: clu reads the metric classes from the annotations.
import math

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics

LN2 = math.log(2.0)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats.

    Args:
        logits: `(..., V)` logits (computed in float32).
        targets: `(...)` integer targets in `[0, V)`.

    Returns:
        float32 `(...)` losses `-log softmax(logits)[target]`.
    """
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets.astype(jnp.int32)
    )


def weighted_loss_sum(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted sum of per-token losses.

    Args:
        logits: `(B, L, V)` logits.
        targets: `(B, L)` integer targets.
        weights: `(B, L)` weights, 0 on padding.

    Returns:
        `(sum_t w_t * loss_t, sum_t w_t, per-token losses (B, L))`, all float32. Positions with
        weight 0 contribute exactly 0 (their loss is masked out, not multiplied).
    """
    losses = token_cross_entropy(logits, targets)
    weights = weights.astype(jnp.float32)
    masked = jnp.where(weights > 0, losses * weights, 0.0)
    return masked.sum(), weights.sum(), losses


def nats_to_bits(loss: jax.Array | float) -> jax.Array | float:
    """Converts a loss in nats per byte to bits per byte."""
    return loss / LN2


@flax.struct.dataclass
class Std(metrics.Std):
    """Standard deviation; clu 0.0.12's `Std.compute` calls `jnp.clip(a_min=...)`, removed in
    jax 0.10."""

    def compute(self) -> jnp.ndarray:
        mean = self.total / self.count
        variance = self.sum_of_squares / self.count - mean**2
        return jnp.sqrt(jnp.maximum(variance, 0.0))


@flax.struct.dataclass
class Count(metrics.Metric):
    """Number of steps for which a boolean model output was true (summed over merges)."""

    total: jnp.ndarray

    @classmethod
    def empty(cls) -> "Count":
        return cls(total=jnp.array(0, jnp.int32))

    @classmethod
    def from_model_output(cls, values: jnp.ndarray, **_) -> "Count":
        return cls(total=jnp.sum(values).astype(jnp.int32))

    def merge(self, other: "Count") -> "Count":
        return type(self)(total=self.total + other.total)

    def compute(self) -> jnp.ndarray:
        return self.total


def _applied(outputs: dict) -> jnp.ndarray:
    """Whether the step counts in the averages: True unless it was skipped."""
    return jnp.logical_not(outputs.get("skipped", False))


def _masked_loss(loss: jnp.ndarray, token_mask: jnp.ndarray, **outputs) -> dict[str, jnp.ndarray]:
    return {"values": loss, "mask": jnp.logical_and(token_mask, _applied(outputs))}


def _masked_bits(loss: jnp.ndarray, token_mask: jnp.ndarray, **outputs) -> dict[str, jnp.ndarray]:
    return {"values": loss / LN2, "mask": jnp.logical_and(token_mask, _applied(outputs))}


def _scalar(name: str):
    def fun(**outputs) -> dict[str, jnp.ndarray]:
        mask = jnp.reshape(_applied(outputs), (1,))
        return {"values": jnp.reshape(outputs[name], (1,)), "mask": mask}

    return fun


def _flag(name: str):
    def fun(**outputs) -> jnp.ndarray:
        return jnp.asarray(outputs.get(name, False))

    return fun


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """Training metrics: token-averaged loss and bits per byte, the mean and spread of the
    per-step loss and gradient norm, the last learning rate, and counts of non-finite steps.

    Built with `single_from_model_output(loss=(..., L) per-token losses, token_mask=bool (..., L),
    step_loss=(), grad_norm=(), learning_rate=())` and optionally the boolean scalars
    `nonfinite_loss`, `nonfinite_grad_norm`, `nonfinite_update` (the new parameters) and
    `skipped` (the update was not applied; such a step counts in no average).
    """

    loss: metrics.Average.from_fun(_masked_loss)
    bits_per_byte: metrics.Average.from_fun(_masked_bits)
    loss_std: Std.from_fun(_scalar("step_loss"))
    grad_norm: metrics.Average.from_fun(_scalar("grad_norm"))
    learning_rate: metrics.LastValue.from_fun(lambda learning_rate, **_: learning_rate)
    nonfinite_loss: Count.from_fun(_flag("nonfinite_loss"))
    nonfinite_grad_norm: Count.from_fun(_flag("nonfinite_grad_norm"))
    nonfinite_update: Count.from_fun(_flag("nonfinite_update"))
    skipped_updates: Count.from_fun(_flag("skipped"))


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    """Evaluation metrics over all non-padded target bytes.

    Built with `single_from_model_output(loss=(B, L) per-token losses, token_mask=bool (B, L))`.
    """

    loss: metrics.Average.from_fun(_masked_loss)
    bits_per_byte: metrics.Average.from_fun(_masked_bits)
