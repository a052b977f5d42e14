"""Watching training for non-finite steps without a device sync per step.

Each train step reports, as device scalars, whether its loss, its gradient norm and its
updated parameters were finite (`steps.train_step`). The loop hands them to a `NonFiniteMonitor`
and calls `check()` before anything leaves the step loop: a log line, an evaluation, a
sample, a checkpoint and the end. `check()` fetches the flags of the steps since the last
check in one transfer and finds the first bad step exactly. With `config.nan_policy='stop'`
it raises `NonFiniteTrainingError` naming the step, the metric and the last good checkpoint,
so nothing non-finite is ever logged as a result or saved; with `'skip'` the step's update
was not applied (inside the compiled step) and `check()` logs a warning per skipped step.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import logging
from etils import epath

from megalodon_flax.training.errors import NonFiniteTrainingError

_WHAT = ("loss", "gradient norm", "updated parameters")


def describe(flags: tuple[int, int, int]) -> str:
    """`the loss and the gradient norm are not finite (NaN or inf)` for the set flags."""
    names = [name for name, flag in zip(_WHAT, flags, strict=True) if flag]
    verb = "is" if len(names) == 1 and names[0] != _WHAT[2] else "are"  # "parameters are"
    return f"the {' and the '.join(names)} {verb} not finite (NaN or inf)"


class NonFiniteMonitor:
    """Collects the per-step non-finite flags and acts on them by the run's `nan_policy`.

    Attributes:
        skipped: Updates skipped so far by this process's run.
    """

    def __init__(self, policy: str, checkpoint_dir: epath.Path, last_good_step: int | None):
        self.policy = policy
        self.checkpoint_dir = checkpoint_dir
        self.last_good_step = last_good_step
        self.skipped = 0
        self._pending: list[tuple[int, Any]] = []

    def record(self, step: int, step_metrics: Any) -> None:
        """Keeps the flags of `step` (device scalars of its `TrainMetrics`) until `check()`."""
        flags = (
            step_metrics.nonfinite_loss.total,
            step_metrics.nonfinite_grad_norm.total,
            step_metrics.nonfinite_update.total,
        )
        self._pending.append((step, flags))

    def saved(self, step: int) -> None:
        """Notes that checkpoint `step` was saved (after a `check()` found all steps finite)."""
        self.last_good_step = step

    def _last_good(self) -> str:
        if self.last_good_step is None:
            return "no checkpoint was saved"
        path = self.checkpoint_dir / str(self.last_good_step)
        return f"the last good checkpoint is {path} (step {self.last_good_step})"

    def check(self) -> None:
        """Acts on the steps recorded since the last check.

        Raises:
            NonFiniteTrainingError: With `nan_policy='stop'`, at the first non-finite step.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = jax.device_get([flags for _, flags in pending])
        for (step, _), flags in zip(pending, values, strict=True):
            flags = tuple(int(f) for f in flags)
            if not any(flags):
                continue
            if self.policy == "stop":
                raise NonFiniteTrainingError(
                    f"training stopped at step {step}: {describe(flags)}. Nothing from step "
                    f"{step} on was saved; {self._last_good()}. Lower "
                    "config.optimizer.learning_rate, set config.optimizer.grad_clip_norm > 0, "
                    "or rerun with --config.nan_policy=skip to skip such updates."
                )
            self.skipped += 1
            logging.warning(
                "Step %d: %s; its update was skipped (config.nan_policy='skip', %d skipped so far)",
                step,
                describe(flags),
                self.skipped,
            )
