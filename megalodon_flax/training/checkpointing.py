"""Orbax checkpoints of the train state, the data position and the run's metadata.

A checkpoint step directory `<workdir>/checkpoints/<step>/` holds four items:

* `state`: the `TrainState` (step, params, optimizer state and the RNG key), sharded arrays;
* `data`: JSON `{'step': ..., 'train_iterator': <iterator state>}`, the input position;
* `meta`: JSON with the model family and config, to check a resume and explain a mismatch;
* `integrity`: JSON with a SHA-256 checksum per array (`training/integrity.py` states which).

Saving refuses a state with non-finite values and a disk without room for it; a failed save
leaves no temp folder and ends in one `CheckpointError` line. Restoring takes the newest
*complete* step (`training/checkpoint_files.py`), checks the stored tree against the target,
then the checksums (checkpoints without them, written before they existed, skip this) and
the finiteness of every array: a checkpoint of another model, a damaged or a non-finite one
stops with a `CheckpointError` that names the directory and the array. `restore_run` loads a
finished or running training run back from its workdir (config and newest weights) for the
tools: sampling, evaluation and conversion.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from megalodon_flax import families
from megalodon_flax.megalodon import layer_stack
from megalodon_flax.training import checkpoint_files, checkpoint_layout, integrity
from megalodon_flax.training.config import TrainConfig
from megalodon_flax.training.errors import (
    CheckpointError,
    NonFiniteTrainingError,
    WorkdirError,
)
from megalodon_flax.training.orbax_noise import quiet_orbax_logs as quiet_orbax_logs

STATE = "state"
DATA = "data"
META = "meta"
INTEGRITY = "integrity"
CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILENAME = "config.json"


def create_manager(
    workdir: epath.PathLike, *, max_to_keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
    """Returns a CheckpointManager over `<workdir>/checkpoints` with the four items."""
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
            INTEGRITY: ocp.JsonCheckpointHandler(),
        },
    )


def step_directory(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Directory of checkpoint `step`."""
    return epath.Path(manager.directory) / str(step)


def _last_complete(directory: epath.Path, before: int | None = None) -> str:
    steps = [s for s in checkpoint_files.complete_steps(directory) if before is None or s < before]
    if not steps:
        return "the workdir holds no complete checkpoint"
    return f"the newest complete checkpoint is {directory / str(steps[-1])}"


def _save_failed(directory: epath.Path, err: BaseException) -> CheckpointError:
    """One-line error for a failed save, after deleting its temp folders."""
    removed = checkpoint_files.remove_temp_folders(directory)
    cleaned = f"; its temp folders {removed} were removed" if removed else ""
    return CheckpointError(
        f"saving a checkpoint to {directory} failed ({checkpoint_files.short_cause(err)})"
        f"{cleaned}; {_last_complete(directory)}. Free space or fix the file system and "
        "rerun the same command (it resumes from the newest complete checkpoint)."
    )


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

    Raises:
        NonFiniteTrainingError: `state` holds a NaN or an infinity (nothing is written).
        CheckpointError: Too little free space for the state (nothing is written), or the
            save (or the previous asynchronous one) failed; its temp folders are removed.
    """
    directory = epath.Path(manager.directory)
    bad = integrity.nonfinite_arrays(state)
    if bad:
        raise NonFiniteTrainingError(
            f"refusing to save checkpoint {step} to {directory}: non-finite values in "
            f"{_some(bad)}; {_last_complete(directory)}"
        )
    needed = checkpoint_files.state_nbytes(state) + checkpoint_files.SPACE_MARGIN_BYTES
    free = checkpoint_files.free_bytes(directory)
    if free < needed:
        raise CheckpointError(
            f"not enough free space to save checkpoint {step} in {directory}: it needs about "
            f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; "
            f"{_last_complete(directory)}. Free space and rerun the same command (it resumes "
            "from the newest complete checkpoint)."
        )
    record = integrity.checksums(state) if jax.process_index() == 0 else {}
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: ocp.args.JsonSave(dict(data_state)),
                    META: ocp.args.JsonSave(dict(meta)),
                    INTEGRITY: ocp.args.JsonSave(record),
                }
            ),
            force=True,
        )
    except Exception as err:
        raise _save_failed(directory, err) from None


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for a pending save and closes `manager`.

    Raises:
        CheckpointError: The pending save failed (its temp folders are removed).
    """
    try:
        manager.wait_until_finished()
    except Exception as err:
        _close_after_failure(manager)  # joins the save's threads before its folders go
        raise _save_failed(epath.Path(manager.directory), err) from None
    manager.close()


def _close_after_failure(manager: ocp.CheckpointManager) -> None:
    try:
        manager.close()
    except Exception as err:  # the failure is being reported already
        logging.warning("Closing the checkpoint manager: %s", checkpoint_files.short_cause(err))


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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


def read_meta(step_dir: epath.Path) -> dict[str, Any] | None:
    """The `meta` item of a checkpoint directory, or None if absent or unreadable."""
    path = step_dir / META / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def latest_complete(directory: epath.PathLike, warn: bool = True) -> epath.Path | None:
    """The newest complete step directory under `directory` (a checkpoints folder), if any;
    `warn` logs each newer incomplete step folder that is skipped."""
    directory = epath.Path(directory)
    steps = checkpoint_files.complete_steps(directory)
    skipped = [
        p
        for p in checkpoint_files.incomplete_steps(directory)
        if warn and (not steps or int(p.name) > steps[-1])
    ]
    for path in skipped:
        logging.warning(
            "Skipping the incomplete checkpoint folder %s (its save did not finish)", path
        )
    return directory / str(steps[-1]) if steps else None


def _fallback_advice(directory: epath.Path, step: int) -> str:
    older = [s for s in checkpoint_files.complete_steps(directory.parent) if s < step]
    if older:
        return (
            f"Move {directory} out of {directory.parent} to resume from the previous "
            f"checkpoint (step {older[-1]})."
        )
    return "It is the only checkpoint: start the run over in another --workdir."


def _read_integrity(directory: epath.Path) -> dict[str, Any] | None:
    """The `integrity` item, None for checkpoints written before it existed."""
    path = directory / INTEGRITY / "metadata"
    if not (directory / INTEGRITY).exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
            raise ValueError("not a checksum record")
    except (OSError, ValueError) as err:
        advice = _fallback_advice(directory, int(directory.name))
        raise CheckpointError(
            f"checkpoint {directory} is damaged: its checksum record {path} is unreadable "
            f"({checkpoint_files.short_cause(err)}). {advice}"
        ) from None
    return record


def restore_latest(
    manager: ocp.CheckpointManager, target: Any, meta: Mapping[str, Any]
) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest complete checkpoint onto the shardings of `target`.

    Incomplete step folders (no commit marker) are skipped with a warning. The restored
    arrays are checked against the checkpoint's checksums (when it has them) and for
    non-finite values.

    Args:
        manager: From `create_manager`.
        target: Abstract train state: `jax.ShapeDtypeStruct`s carrying the desired shardings.
        meta: The current run's metadata, compared with the stored one for the error message.

    Returns:
        `(step, state, data_state)`, or None when the directory holds no complete checkpoint.

    Raises:
        CheckpointError: If the checkpoint is unreadable, damaged, non-finite or does not fit
            `target`; the message names the step directory (and the array, when known).
    """
    directory = latest_complete(manager.directory)
    if directory is None:
        return None
    step = int(directory.name)
    advice = _fallback_advice(directory, step)
    try:
        metadata = manager.item_metadata(step)
        stored_tree = metadata[STATE]
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        if stored_tree is None:
            raise ValueError("the state item has no metadata")
        stored = _flat_shapes(stored_tree, serialize=False)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {directory} is damaged or unreadable "
            f"({checkpoint_files.short_cause(err)}). {advice}"
        ) from None
    stored_meta = read_meta(directory)
    problems = _describe_mismatch(stored, _flat_shapes(target, serialize=True))
    stored_layout_target = None
    if problems:
        other = checkpoint_layout.stored_layout_target(stored_tree, target)
        if other is not None and not _describe_mismatch(
            stored, _flat_shapes(other, serialize=False)
        ):
            stored_layout_target, problems = other, []
    if problems:
        raise CheckpointError(
            f"Checkpoint {directory} does not match the current model (was it written by a run "
            f"with another config?):\n  "
            + "\n  ".join(problems)
            + "\n"
            + _model_differences(stored_meta, meta)
            + " Use another --workdir for this model, or rerun with the run's config "
            f"({epath.Path(manager.directory).parent / CONFIG_FILENAME})."
        )
    record = _read_integrity(directory)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardRestore(
                        target if stored_layout_target is None else stored_layout_target
                    ),
                    DATA: ocp.args.JsonRestore(),
                }
            ),
        )
    except Exception as err:
        array = checkpoint_files.failed_array(err)
        where = f": array {array} could not be read" if array else " and could not be restored"
        raise CheckpointError(
            f"checkpoint {directory} is damaged or truncated{where} "
            f"({checkpoint_files.short_cause(err)}). {advice}"
        ) from None
    state = restored[STATE]
    if record is not None:
        damaged = integrity.damaged_arrays(state, record)
        if damaged:
            raise CheckpointError(
                f"checkpoint {directory} is damaged: the bytes of {_some(damaged)} differ from "
                f"those saved. {advice}"
            )
    bad = integrity.nonfinite_arrays(state)
    if bad:
        raise CheckpointError(
            f"checkpoint {directory} holds non-finite values (NaN or inf) in {_some(bad)}: "
            f"refusing to resume from it. {advice}"
        )
    if stored_layout_target is not None:
        state = checkpoint_layout.into_target_layout(state, target)
        logging.info(
            "Checkpoint %s holds the %s layer layout: converted to this run's layout",
            directory,
            layer_stack.layout_of(stored_tree.get("params")),
        )
    logging.info(
        "Restored checkpoint %s (%s)",
        directory,
        "checksums verified" if record is not None else "no checksums: written before them",
    )
    return step, state, dict(restored[DATA])


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
    """Returns `workdir` as a path; raises `WorkdirError` (a ValueError) if it or a parent is a
    file."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"workdir {path} exists and is not a directory.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WorkdirError(f"workdir {path}: {parent} is a file, not a directory.")
            break
    return path


def run_metadata(config: TrainConfig) -> dict[str, Any]:
    """The `meta` item of a run's checkpoints: its model family and config, sequence length."""
    return {
        "model_family": config.model_family,
        "model": config.model.to_dict(),
        "seq_len": config.seq_len,
    }


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

    quiet_orbax_logs()
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
