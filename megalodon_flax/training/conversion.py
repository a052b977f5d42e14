"""A training run's weights to PyTorch files and back (spec §8).

`export_run` writes the newest checkpoint of a workdir in the megalodon-hf layout, as a
directory that megalodon-hf's `MegalodonForCausalLM.from_pretrained` loads
(`model.safetensors` + `config.json`), or in the upstream layout, as one `.safetensors`
file. `import_run` writes PyTorch weights (a file or such a directory) as the step-0
checkpoint of a new workdir, so that training (fine-tuning), sampling and evaluation use them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from etils import epath

from megalodon_flax.megalodon import convert, hf_config
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.training import checkpointing
from megalodon_flax.training.config import TrainConfig
from megalodon_flax.training.setup import setup_training


def _megalodon(config: object, where: str) -> MegalodonConfig:
    if not isinstance(config, MegalodonConfig):
        raise convert.ConversionError(
            f"{where} is a {type(config).__name__}; only Megalodon models convert to and from "
            "the PyTorch Megalodon layouts"
        )
    return config


def export_run(workdir: str, fmt: str, out: str, dtype: str = "float32") -> convert.StateDict:
    """Writes the newest checkpoint of `workdir` as a `fmt` state dict to `out`.

    `fmt="hf"`: `out` is a directory holding `model.safetensors` (metadata `format: "pt"`) and
    megalodon-hf's `config.json`. `fmt="upstream"`: `out` is a `.safetensors` file. Either
    way the metadata also records the layout, the step and this implementation's config.

    Raises:
        ConversionError: Not a Megalodon run, or a model that the layout cannot hold exactly.
    """
    _megalodon(checkpointing.load_run_config(workdir).model, f"the model of {workdir}")
    run = checkpointing.restore_run(workdir)
    model_config = _megalodon(run.model_config, f"the model of {workdir}")
    state_dict = convert.to_state_dict(run.params, model_config, fmt, dtype)
    metadata = {
        "format": "pt",  # transformers accepts pt, tf, flax or mlx
        "megalodon_flax_layout": fmt,
        "step": str(run.step),
        "megalodon_flax_config": json.dumps(model_config.to_dict()),
    }
    if fmt == "hf":
        convert.save_hf_directory(
            state_dict, hf_config.to_hf_config(model_config, dtype), out, metadata
        )
    else:
        convert.save_state_dict(state_dict, out, metadata)
    return state_dict


def check_hf_directory(in_path: str, model: MegalodonConfig) -> None:
    """Refuses a Hugging Face directory whose `config.json` describes another model.

    Raises:
        ConversionError: The config is unreadable, not megalodon-hf's, or differs from `model`
            in a field that changes the weights or the function (all differences listed).
    """
    path = os.path.join(in_path, convert.HF_CONFIG_NAME)
    if not os.path.isdir(in_path) or not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            theirs = hf_config.from_hf_config(json.load(f), path)
    except (OSError, ValueError) as err:  # ConfigError and JSONDecodeError are ValueErrors
        raise convert.ConversionError(f"{path} cannot be used: {err}") from None
    differences = hf_config.model_differences(theirs, model)
    if differences:
        raise convert.ConversionError(
            f"{path} describes another model than --config (theirs vs ours): "
            + "; ".join(differences)
        )


def import_run(in_path: str, fmt: str, config: TrainConfig, workdir: str) -> int:
    """Writes the PyTorch weights of `in_path` as the step-0 checkpoint of a new workdir.

    `in_path` is a state-dict file or a Hugging Face model directory (its `config.json`,
    if any, must describe `config.model`). The checkpoint holds the imported parameters with
    a fresh optimizer state.

    Returns:
        The number of imported parameters.

    Raises:
        FileExistsError: `workdir` already holds checkpoints.
        ConversionError: The file cannot be read or does not fit `config.model` (every
            missing, misshapen, wrongly typed or non-finite tensor is named).
    """
    model = _megalodon(config.model, "--config's model")
    target = epath.Path(workdir)
    checkpoints = target / checkpointing.CHECKPOINT_SUBDIR
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise FileExistsError(f"{target} already holds checkpoints; choose a new --workdir")
    if fmt == "hf":
        check_hf_directory(in_path, model)
    params = convert.from_state_dict(convert.load_state_dict(in_path), model, fmt)
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
