"""What the command-line entry points share: turning parsed flags into checked objects."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from absl import app

from megalodon_flax.config_base import ConfigError
from megalodon_flax.training import checkpointing
from megalodon_flax.training.config import TrainConfig


def fail(message: str) -> NoReturn:
    """Exits with status 1 after printing `error: message` to stderr."""
    sys.exit(f"error: {message}")


def train_config(parsed: Any) -> TrainConfig:
    """The validated `TrainConfig` of a `--config` file parsed by `config_flags`; a bad
    config exits with one line naming the field."""
    try:
        return TrainConfig.from_mapping(parsed)
    except ConfigError as err:
        fail(str(err))


def restore_run(workdir: str) -> checkpointing.TrainedRun:
    """The newest checkpoint of `workdir`; a missing or bad workdir exits with one line."""
    try:
        return checkpointing.restore_run(workdir)
    except (FileNotFoundError, ConfigError, checkpointing.CheckpointError) as err:
        fail(str(err))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a `--config.<path>=...` override of a field that does not
    exist ending in one line that names it (ml_collections raises an AttributeError)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:
        missing = str(err).strip("'\"")
        overrides = [a[2:].split("=")[0] for a in argv if a.startswith("--config.")]
        named = [o for o in overrides if missing in o.split(".")] or [missing]
        fail(f"unknown config keys: {named}")
