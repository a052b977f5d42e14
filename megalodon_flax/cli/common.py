"""What the command-line entry points share: turning parsed flags into checked objects."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import app, flags

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
    except OSError as err:  # config_flags defers a failed load of the file to its first read
        fail(f"--config: {str(err).strip().splitlines()[-1].strip()}")


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


# --------------------------------------------------------------------------- argument checks
# The CLIs other than `train` register these as absl validators, so that a bad argument
# stops the program before anything is loaded, with `parse_checked_flags` printing one line.


_OWN = "\x1f"  # marks where a `check_flags` message starts in absl's error text


def parse_checked_flags(argv: list[str]) -> list[str]:
    """`parse_flags`, with a flag that fails its bounds or validators ending in one line
    (`error: flag --x=v: why`) instead of absl's two-line usage error."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        text = str(err)
        # A `check_flags` message follows absl's listing of every flag value (a whole
        # config included): keep the message alone; keep `flag --x=v: why` lines whole.
        own = re.findall(_OWN + r"([^\n]*)", text)
        lines = [line.strip() for line in text.splitlines() if line.startswith("flag --")]
        others = [line for line in lines if _OWN not in line]
        fail("; ".join(others + own) if own else "; ".join(text.split("\n")))
    except (AttributeError, KeyError):
        return parse_flags(argv)  # an unknown --config.<path>: one line naming it


def check_flag(
    name: str,
    problem: Callable[[Any], str | None],
    flag_values: flags.FlagValues = flags.FLAGS,
) -> None:
    """Registers `problem(value) -> message or None` as the validator of flag `name`."""

    def checker(value: Any) -> bool:
        message = problem(value)
        if message:
            raise flags.ValidationError(message)
        return True

    flags.register_validator(name, checker, flag_values=flag_values)


def check_flags(
    names: list[str],
    problem: Callable[[dict[str, Any]], str | None],
    flag_values: flags.FlagValues = flags.FLAGS,
) -> None:
    """Registers `problem({name: value}) -> message or None` as a validator of several flags."""

    def checker(values: dict[str, Any]) -> bool:
        message = problem(values)
        if message:
            raise flags.ValidationError(_OWN + message)
        return True

    flags.register_multi_flags_validator(names, checker, flag_values=flag_values)


def existing_dir_problem(path: str | None) -> str | None:
    """Why `path` is not an existing directory (None: it is, or no path was given)."""
    if path is None:
        return None
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    return None


def readable_file_problem(path: str | None) -> str | None:
    """Why `path` is not a readable regular file (None: it is, or no path was given)."""
    if path is None:
        return None
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isfile(path):
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable"
    return None


def output_path_problem(
    path: str | None, directory: bool = False, make_folders: bool = False
) -> str | None:
    """Why `path` cannot be written as a new or replaced file (or, with `directory`, a
    directory): it is empty, the kind of thing already there differs, or its folder is
    missing (unless `make_folders`: then the nearest existing folder must be writable) or
    not writable. None: it can be, or no path was given."""
    if path is None:
        return None
    if not path.strip():
        return "the path is empty"
    if os.path.exists(path) and os.path.isdir(path) != directory:
        return f"{path} exists and is {'not ' if directory else ''}a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if make_folders:
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            return f"{parent} is a file, not a folder"
    elif not os.path.isdir(parent):
        return f"the folder {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"the folder {parent} is not writable"
    return None
