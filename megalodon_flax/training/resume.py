"""What a run may change when it resumes a workdir: the rule, and the check against the saved run.

The rule (also in the README, "Resuming: what may change"):

* Model fields that change what the model computes refuse the resume: every field of
  `MegalodonConfig` / `LlamaConfig` and `model_family`, except the ones listed below. This
  holds even when the shapes agree (`chunk_size`, `timestep_norm_variant`, `norm_eps`, ...).
* Model fields that change only how the same function is computed or trained are logged:
  `remat_policy`, `scan_layers` (the checkpoint's parameters are restacked on restore),
  `attention_impl`, `cema_path`, `sequential_cema_below`, `cema_block_size` (the CEMA paths
  compute the same recurrence), `compute_dtype` (the matmul precision; the stored parameters keep
  their `param_dtype`), `init_mode` / `init_std` (used only to initialize, and the
  parameters now come from the checkpoint) and the dropout rates (`dropout`,
  `attention_dropout`, `hidden_dropout`, `embedding_dropout`: training-time noise, the
  evaluated function is the same).
* Every training field (batch size, learning rate, schedule, seed, sequence length,
  `num_train_steps`, evaluation, ...) may change: each difference is logged as a warning.

The model config a checkpoint was trained with is read from the checkpoint's `meta` item
(the authority for its weights), else from `<workdir>/config.json`. Nothing is written by
this check; `config.json` is replaced only after it passed and the checkpoint restored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath

from megalodon_flax import families
from megalodon_flax.config_base import ConfigError
from megalodon_flax.training.config import TrainConfig
from megalodon_flax.training.errors import ResumeMismatchError

# Model fields that change how the same function is computed, not the function.
EXECUTION_FIELDS = frozenset(
    {
        "remat_policy",
        "scan_layers",
        "attention_impl",
        "cema_path",
        "sequential_cema_below",
        "cema_block_size",
        "compute_dtype",
    }
)
# Model fields used only to initialize parameters (a resume restores them instead).
INIT_FIELDS = frozenset({"init_mode", "init_std"})
# Model fields that act only during training (the evaluated function is the same).
TRAINING_ONLY_FIELDS = frozenset(
    {"dropout", "attention_dropout", "hidden_dropout", "embedding_dropout"}
)
LOGGED_MODEL_FIELDS = EXECUTION_FIELDS | INIT_FIELDS | TRAINING_ONLY_FIELDS


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    old, new = _flat(_json(old)), _flat(_json(new))
    missing = object()
    return {
        k: (old.get(k, missing), new.get(k, missing))
        for k in sorted(set(old) | set(new))
        if old.get(k, missing) != new.get(k, missing)
    }


def _describe(diffs: Mapping[str, tuple[Any, Any]]) -> str:
    def show(v: Any) -> str:
        return "(absent)" if not isinstance(v, str | int | float | bool | list | None) else repr(v)

    return ", ".join(f"{k}: {show(a)} -> {show(b)}" for k, (a, b) in diffs.items())


def _saved_model(
    model: Mapping[str, Any], family_name: str | None, current: TrainConfig
) -> dict[str, Any]:
    """A saved model mapping with the defaults of its family filled in (as the run read it)."""
    family = families.get_family(family_name or current.model_family)
    try:
        return family.config_class.from_mapping(dict(model)).to_dict()
    except (ConfigError, TypeError, ValueError):
        return dict(model)


def model_differences(
    saved_model: Mapping[str, Any],
    saved_family: str | None,
    current: TrainConfig,
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """`(refusing, logged)` differences between a saved model config and `current.model`."""
    diffs = _diff(_saved_model(saved_model, saved_family, current), current.model.to_dict())
    refusing = {k: v for k, v in diffs.items() if k not in LOGGED_MODEL_FIELDS}
    logged = {k: v for k, v in diffs.items() if k in LOGGED_MODEL_FIELDS}
    if saved_family is not None and saved_family != current.model_family:
        refusing = {"model_family": (saved_family, current.model_family), **refusing}
    return refusing, logged


def read_saved_config(workdir: epath.Path) -> tuple[TrainConfig | None, str]:
    """`(config.json as a TrainConfig or None, why it is None)`; never raises."""
    from megalodon_flax.training.checkpointing import CONFIG_FILENAME

    path = workdir / CONFIG_FILENAME
    if not path.exists():
        return None, "absent"
    try:
        return TrainConfig.from_mapping(json.loads(path.read_text())), ""
    except (OSError, ValueError, ConfigError) as err:
        return None, f"unreadable ({type(err).__name__}: {err})"


def check_resume(
    workdir: epath.Path,
    config: TrainConfig,
    checkpoint: epath.Path | None,
    stored_meta: Mapping[str, Any] | None,
) -> None:
    """Checks `config` against the run saved in `workdir` (see the module docstring).

    Args:
        workdir: The workdir.
        config: The config of the run about to start.
        checkpoint: The newest complete checkpoint directory, None when there is none.
        stored_meta: That checkpoint's `meta` item (None if absent or unreadable).

    Raises:
        ResumeMismatchError: A model field that changes the computation differs from the
            one the checkpoint was trained with. Nothing in the workdir was changed.
    """
    saved, why = read_saved_config(workdir)
    if checkpoint is None:
        if saved is not None and saved != config:
            logging.warning(
                "%s holds no complete checkpoint: starting over and replacing its config.json "
                "(saved -> now: %s)",
                workdir,
                _describe(_diff(saved.to_dict(), config.to_dict())),
            )
        return
    if stored_meta and "model" in stored_meta:
        saved_model, saved_family = stored_meta["model"], stored_meta.get("model_family")
        if saved_family is None and saved is not None:
            saved_family = saved.model_family
    elif saved is not None:
        saved_model, saved_family = saved.model.to_dict(), saved.model_family
    else:
        logging.warning(
            "Cannot compare with the config %s was trained with (config.json %s, no model in "
            "the checkpoint's metadata); relying on the shape check",
            checkpoint,
            why,
        )
        return
    refusing, logged = model_differences(saved_model, saved_family, config)
    if refusing:
        raise ResumeMismatchError(
            f"cannot resume from {checkpoint}: it was trained with another model config "
            f"(checkpoint -> current: {_describe(refusing)}). These fields change what the "
            f"model computes. Rerun with the run's model settings (see {workdir}/config.json) "
            "or use another --workdir; nothing in the workdir was changed."
        )
    if logged:
        logging.warning(
            "Resuming %s with model fields that change only how the model is computed or "
            "trained (checkpoint -> now): %s",
            workdir,
            _describe(logged),
        )
    if saved is None:
        logging.warning("config.json of %s is %s: training fields are not compared", workdir, why)
        return
    saved_training = {k: v for k, v in saved.to_dict().items() if k != "model"}
    training = {k: v for k, v in config.to_dict().items() if k != "model"}
    changed = _diff(saved_training, training)
    if changed:
        logging.warning(
            "Resuming %s with a changed training config (saved -> now): %s",
            workdir,
            _describe(changed),
        )
