"""A training run's weights to a PyTorch state-dict file and back (spec §8).

`export_run` writes the newest checkpoint of a workdir in the megalodon-hf or upstream
layout; `import_run` writes PyTorch weights as the step-0 checkpoint of a new workdir, so
that training (fine-tuning), sampling and evaluation use them.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from etils import epath

from megalodon_flax.megalodon import convert
from megalodon_flax.training import checkpointing
from megalodon_flax.training.config import TrainConfig
from megalodon_flax.training.setup import setup_training


def export_run(workdir: str, fmt: str, out: str, dtype: str = "float32") -> convert.StateDict:
    """Writes the newest checkpoint of `workdir` as a `fmt` state dict to `out` (.safetensors).

    Raises:
        ConversionError: A model that the layout cannot hold exactly.
    """
    run = checkpointing.restore_run(workdir)
    state_dict = convert.to_state_dict(run.params, run.model_config, fmt, dtype)
    metadata = {
        "format": fmt,
        "step": str(run.step),
        "megalodon_flax_config": json.dumps(run.model_config.to_dict()),
    }
    convert.save_state_dict(state_dict, out, metadata)
    return state_dict


def import_run(in_path: str, fmt: str, config: TrainConfig, workdir: str) -> int:
    """Writes the PyTorch weights of `in_path` as the step-0 checkpoint of a new workdir.

    The checkpoint holds the imported parameters with a fresh optimizer state.

    Returns:
        The number of imported parameters.

    Raises:
        FileExistsError: `workdir` already holds checkpoints.
        ConversionError: The file does not fit `config.model`.
    """
    params = convert.from_state_dict(convert.load_state_dict(in_path), config.model, fmt)
    target = epath.Path(workdir)
    checkpoints = target / checkpointing.CHECKPOINT_SUBDIR
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise FileExistsError(f"{target} already holds checkpoints; choose a new --workdir")
    checkpointing.validate_workdir(target)
    target.mkdir(parents=True, exist_ok=True)
    setup = setup_training(config)
    state = setup.init_state()
    state = state.replace(
        params=jax.tree.map(
            lambda old, new: jax.device_put(np.asarray(new).astype(old.dtype), old.sharding),
            state.params,
            params,
        )
    )
    checkpointing.save_config(config, target)
    manager = checkpointing.create_manager(target, max_to_keep=1, async_save=False)
    try:
        checkpointing.save(
            manager,
            0,
            state,
            {"step": 0, "train_iterator": {"step": 0}},
            checkpointing.run_metadata(config),
        )
        manager.wait_until_finished()
    finally:
        manager.close()
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
