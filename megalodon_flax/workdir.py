"""Loading a training run back from its workdir: the saved config and the newest weights."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections
from etils import epath

from megalodon_flax import checkpointing, models, train


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's config, its model and the parameters of its newest checkpoint."""

    config: ml_collections.ConfigDict
    model_config: models.ModelConfig
    model: models.LanguageModel
    params: Any
    step: int


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    return value


def load_run_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """Reads `<workdir>/config.json` (written by training) back into a ConfigDict."""
    workdir = epath.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist or is not a directory")
    path = workdir / checkpointing.CONFIG_FILENAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a training workdir (train with "
            f"`python main.py --config=... --workdir={workdir}` first)"
        )
    return ml_collections.ConfigDict(_lists_to_tuples(json.loads(path.read_text())))


def load_trained_run(workdir: epath.PathLike) -> TrainedRun:
    """Restores the newest checkpoint of `workdir` on the local devices.

    Raises:
      FileNotFoundError: no such workdir, no config.json, or no checkpoint yet.
      checkpointing.CheckpointError: a damaged or mismatched checkpoint.
    """
    config = load_run_config(workdir)
    train.validate_config(config)
    setup = train.setup_training(config)
    manager = checkpointing.create_manager(
        workdir, max_to_keep=config.max_checkpoints_to_keep, async_save=False
    )
    try:
        restored = checkpointing.restore_latest(
            manager, setup.abstract_state, {"model": setup.model_config.to_dict()}
        )
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(
            f"no checkpoint in {epath.Path(workdir) / checkpointing.CHECKPOINT_SUBDIR}"
        )
    step, state, _ = restored
    return TrainedRun(config, setup.model_config, setup.model, state.params, int(step))
