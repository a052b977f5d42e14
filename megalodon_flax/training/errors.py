"""The training system's domain errors: each carries one message that names the cause, the
file or field, and what to do. The command-line tools print it as `error: <message>`."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Base of the errors a user can act on (printed without a traceback by the CLIs)."""


class CheckpointError(TrainingError):
    """A checkpoint cannot be saved or restored: damaged, incomplete, from another model, or
    its disk is full."""


class ResumeMismatchError(CheckpointError):
    """A run would resume a workdir whose checkpoints were trained with a model config that
    computes something else."""


class NonFiniteTrainingError(TrainingError):
    """The loss, the gradient norm or the updated state stopped being finite
    (`config.nan_policy='stop'`)."""


class WorkdirLockedError(TrainingError):
    """Another training run holds the workdir's lock."""


class WorkdirError(TrainingError, ValueError):
    """The workdir path cannot be one: it, or a parent, is a file."""
