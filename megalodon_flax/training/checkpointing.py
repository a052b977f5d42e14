"""Orbax checkpoints of the train state, the data position and the run's metadata.

A checkpoint step directory `<workdir>/checkpoints/<step>/` holds three items:

* `state`: the `TrainState` (step, params, optimizer state and the RNG key), sharded arrays;
* `data`: JSON `{'step': ..., 'train_iterator': <iterator state>}`, the input position;
* `meta`: JSON with the model config, to explain a mismatch in words.

Restoring checks the stored tree against the target first, so a checkpoint of another model
or a damaged one stops with a `CheckpointError` that names the directory. `restore_run`
loads a finished or running training run back from its workdir (config and newest weights)
for the tools: sampling, evaluation and conversion.
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from megalodon_flax import families
from megalodon_flax.training.config import TrainConfig

STATE = "state"
DATA = "data"
META = "meta"
CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILENAME = "config.json"


class CheckpointError(RuntimeError):
    """Raised when a checkpoint cannot be restored (damaged or from another model)."""


def create_manager(
    workdir: epath.PathLike, *, max_to_keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
    """Returns a CheckpointManager over `<workdir>/checkpoints` with the three items."""
    # orbax (tensorstore) requires an absolute path; workdirs are usually given relative.
    directory = epath.Path(os.path.abspath(os.fspath(workdir))) / CHECKPOINT_SUBDIR
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        ),
        item_handlers={
            STATE: ocp.StandardCheckpointHandler(),
            DATA: ocp.JsonCheckpointHandler(),
            META: ocp.JsonCheckpointHandler(),
        },
    )


def step_directory(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Directory of checkpoint `step`."""
    return epath.Path(manager.directory) / str(step)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_state: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> None:
    """Starts saving checkpoint `step` (asynchronously when the manager is async).

    Args:
        manager: From `create_manager`.
        step: Number of completed training steps.
        state: The train state (a pytree of global arrays).
        data_state: JSON-serializable position of the input pipeline.
        meta: JSON-serializable description of the run (model config).
    """
    manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                DATA: ocp.args.JsonSave(dict(data_state)),
                META: ocp.args.JsonSave(dict(meta)),
            }
        ),
        force=True,
    )


def _walk(tree: Any, prefix: str, out: dict[str, tuple[tuple[int, ...], str]]) -> None:
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        out[prefix] = (tuple(tree.shape), str(tree.dtype))
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            _walk(value, f"{prefix}/{key}" if prefix else str(key), out)
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            _walk(value, f"{prefix}/{i}" if prefix else str(i), out)
    # Anything else (None, optax's EmptyState) holds no arrays.


def _flat_shapes(tree: Any, serialize: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{'params/model/.../kernel': (shape, dtype)}` of a state or of stored metadata."""
    if serialize:
        tree = ocp.tree.serialize_tree(tree, keep_empty_nodes=True)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    _walk(tree, "", out)
    return out


def _describe_mismatch(
    stored: Mapping[str, tuple[tuple[int, ...], str]],
    wanted: Mapping[str, tuple[tuple[int, ...], str]],
    limit: int = 8,
) -> list[str]:
    def order(key: str) -> tuple[bool, str]:
        return (not key.startswith("params/"), key)  # parameters first, then the rest

    problems = []
    for key in sorted(set(stored) | set(wanted), key=order):
        if key not in stored:
            problems.append(f"missing in the checkpoint: {key}")
        elif key not in wanted:
            problems.append(f"not in the current model: {key}")
        elif stored[key][0] != wanted[key][0]:
            problems.append(
                f"{key}: checkpoint shape {stored[key][0]}, current model {wanted[key][0]}"
            )
    if len(problems) > limit:
        problems = [*problems[:limit], f"... and {len(problems) - limit} more"]
    return problems


def _model_differences(stored_meta: Mapping[str, Any] | None, meta: Mapping[str, Any]) -> str:
    if not stored_meta or "model" not in stored_meta or "model" not in meta:
        return ""
    old, new = stored_meta["model"], meta["model"]
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return (
        f" Model config differences (checkpoint -> current): {', '.join(diffs)}." if diffs else ""
    )


def restore_latest(
    manager: ocp.CheckpointManager, target: Any, meta: Mapping[str, Any]
) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest checkpoint onto the shardings of `target`.

    Args:
        manager: From `create_manager`.
        target: Abstract train state: `jax.ShapeDtypeStruct`s carrying the desired shardings.
        meta: The current run's metadata, compared with the stored one for the error message.

    Returns:
        `(step, state, data_state)`, or None when the directory holds no checkpoint.

    Raises:
        CheckpointError: If the checkpoint is unreadable or does not fit `target`; the message
            names the step directory.
    """
    step = manager.latest_step()
    if step is None:
        return None
    directory = step_directory(manager, step)
    try:
        metadata = manager.item_metadata(step)
        stored_tree = metadata[STATE]
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        if stored_tree is None:
            raise ValueError("the state item has no metadata")
        stored = _flat_shapes(stored_tree, serialize=False)
    except Exception as err:
        raise CheckpointError(
            f"Checkpoint {directory} is damaged or unreadable ({type(err).__name__}: {err}). "
            f"Delete it (or the whole {manager.directory}) to start over."
        ) from err
    stored_meta = None
    meta_path = directory / META / "metadata"
    if meta_path.exists():
        try:
            stored_meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            stored_meta = None
    problems = _describe_mismatch(stored, _flat_shapes(target, serialize=True))
    if problems:
        raise CheckpointError(
            f"Checkpoint {directory} does not match the current model (was it written by a run "
            f"with another config?):\n  "
            + "\n  ".join(problems)
            + "\n"
            + _model_differences(stored_meta, meta)
            + f" Use another --workdir or delete {manager.directory}."
        )
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore()}
            ),
        )
    except Exception as err:
        raise CheckpointError(
            f"Checkpoint {directory} could not be restored ({type(err).__name__}: {err}). "
            f"It is damaged or incompatible; delete it (or {manager.directory}) to start over."
        ) from err
    logging.info("Restored checkpoint %s", directory)
    return step, restored[STATE], dict(restored[DATA])


class _DropOrbaxInfo(py_logging.Filter):
    """Drops orbax's INFO records (dozens per save); its warnings and errors pass."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


_ORBAX_FILTER = _DropOrbaxInfo()


def quiet_orbax_logs() -> None:
    """Hides orbax's per-save INFO lines from the absl log (idempotent)."""
    logger = py_logging.getLogger("absl")
    if _ORBAX_FILTER not in logger.filters:
        logger.addFilter(_ORBAX_FILTER)


def save_config(config: TrainConfig, workdir: epath.PathLike) -> epath.Path:
    """Writes the run's config as JSON to `<workdir>/config.json` (process 0 only)."""
    path = epath.Path(workdir) / CONFIG_FILENAME
    if jax.process_index() == 0:
        text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
        tmp = path.parent / f".{path.name}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    return path


def validate_workdir(workdir: epath.PathLike) -> epath.Path:
    """Returns `workdir` as a path; raises ValueError if it or a parent is a file."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir {path} exists and is not a directory.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"workdir {path}: {parent} is a file, not a directory.")
            break
    return path


def run_metadata(config: TrainConfig) -> dict[str, Any]:
    """The `meta` item of a run's checkpoints: its model config and sequence length."""
    return {"model": config.model.to_dict(), "seq_len": config.seq_len}


def load_run_config(workdir: epath.PathLike) -> TrainConfig:
    """Reads and validates `<workdir>/config.json` (written by training).

    Raises:
        FileNotFoundError: No such workdir, or no config.json in it.
        ConfigError: A config.json that does not validate.
    """
    workdir = epath.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist or is not a directory")
    path = workdir / CONFIG_FILENAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a training workdir (train with "
            f"`python main.py --config=... --workdir={workdir}` first)"
        )
    return TrainConfig.from_mapping(json.loads(path.read_text()))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's config, its model and the parameters of its newest checkpoint."""

    config: TrainConfig
    model_config: families.ModelConfig
    model: families.LanguageModel
    params: Any
    step: int
    setup: Any  # training.setup.TrainingSetup: mesh, shardings and the jitted eval step


def restore_run(workdir: epath.PathLike) -> TrainedRun:
    """Restores the newest checkpoint of `workdir` on the local devices.

    Raises:
        FileNotFoundError: No such workdir, no config.json, or no checkpoint yet.
        CheckpointError: A damaged or mismatched checkpoint.
    """
    from megalodon_flax.training.setup import setup_training

    config = load_run_config(workdir)
    setup = setup_training(config)
    manager = create_manager(workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=False)
    try:
        restored = restore_latest(manager, setup.abstract_state, run_metadata(config))
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {epath.Path(workdir) / CHECKPOINT_SUBDIR}")
    step, state, _ = restored
    return TrainedRun(config, config.model, setup.model, state.params, int(step), setup)
