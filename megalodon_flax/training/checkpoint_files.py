"""The files of a checkpoint directory: complete and incomplete steps, temp folders, free space,
and failures reduced to one line.

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every
item is written, after putting `commit_success.txt` in it (every checkpoint of this project,
the legacy ones included, has it). A step folder is *complete* when it holds that marker and
its `state` and `data` items. Anything else named like a step (a copy cut short, a folder
from a crashed file system) is *incomplete*: restoring skips it in favour of the newest
complete step, and a training run that resumes renames it to `<step>.incomplete` so that
orbax never counts it.
"""

from __future__ import annotations

import re
import shutil
import time
from typing import Any

import numpy as np
from absl import logging
from etils import epath

COMMIT_MARKER = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"
INCOMPLETE_SUFFIX = ".incomplete"
REQUIRED_ITEMS = ("state", "data")
# Kept free beyond the state's size when saving (metadata, JSON items, file system slack).
SPACE_MARGIN_BYTES = 4 << 20


def is_complete(step_dir: epath.Path) -> bool:
    """Whether `step_dir` is a finished checkpoint (see the module docstring)."""
    return (
        step_dir.is_dir()
        and (step_dir / COMMIT_MARKER).exists()
        and all((step_dir / item).is_dir() for item in REQUIRED_ITEMS)
    )


def _step_dirs(directory: epath.Path) -> list[epath.Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]


def complete_steps(directory: epath.PathLike) -> list[int]:
    """Steps of the complete checkpoints in `directory`, ascending."""
    return sorted(int(p.name) for p in _step_dirs(epath.Path(directory)) if is_complete(p))


def incomplete_steps(directory: epath.PathLike) -> list[epath.Path]:
    """Folders of `directory` named like a step that are not complete checkpoints."""
    dirs = _step_dirs(epath.Path(directory))
    return sorted((p for p in dirs if not is_complete(p)), key=lambda p: int(p.name))


def temp_folders(directory: epath.PathLike, step: int | None = None) -> list[epath.Path]:
    """Orbax's temp folders (unfinished saves) in `directory`, of `step` if given."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    prefix = "" if step is None else f"{step}{TMP_MARKER}"
    return [p for p in directory.iterdir() if TMP_MARKER in p.name and p.name.startswith(prefix)]


def remove_temp_folders(
    directory: epath.PathLike, step: int | None = None, settle_seconds: float = 0.2
) -> list[str]:
    """Deletes orbax's temp folders (of `step`, or all); returns their names.

    After a failed save, writer threads of the same save can still create files in its temp
    folder for a moment, so the folders are deleted again until none has reappeared for
    `settle_seconds` (at most 50 rounds).
    """
    removed: list[str] = []
    quiet_since = time.monotonic()
    for _ in range(50):
        found = temp_folders(directory, step)
        if found:
            quiet_since = time.monotonic()
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
            if path.name not in removed:
                removed.append(path.name)
        if not removed or time.monotonic() - quiet_since >= settle_seconds:
            break
        time.sleep(settle_seconds / 4)
    return removed


def set_aside_incomplete(directory: epath.PathLike) -> None:
    """Renames incomplete step folders to `<step>.incomplete` and deletes temp folders of
    unfinished saves, logging each; only a run holding the workdir lock may call this."""
    for path in incomplete_steps(directory):
        target = path.parent / f"{path.name}{INCOMPLETE_SUFFIX}"
        k = 1
        while target.exists():
            k += 1
            target = path.parent / f"{path.name}{INCOMPLETE_SUFFIX}-{k}"
        path.rename(target)
        logging.warning(
            "Checkpoint folder %s is incomplete (no %s: its save did not finish) and was "
            "skipped; renamed to %s (delete it when you no longer need it)",
            path,
            COMMIT_MARKER,
            target.name,
        )
    removed = remove_temp_folders(directory)
    if removed:
        logging.info("Removed temp folders of unfinished saves in %s: %s", directory, removed)


def state_nbytes(state: Any) -> int:
    """Bytes of all arrays of `state` (global sizes)."""
    import jax

    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(state)
        if hasattr(x, "shape") and hasattr(x, "dtype")
    )


def free_bytes(directory: epath.PathLike) -> int:
    """Free bytes on the file system of `directory` (or of its nearest existing parent)."""
    path = epath.Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


_NOISE = re.compile(r"\s*(\[tensorstore_spec(\[\d+\])?=|See full TensorStore details).*", re.DOTALL)
_ARRAY_PATH = re.compile(r"""(?:'path': '|Error reading ")([A-Za-z_][A-Za-z0-9_.]*)/""")


def _chain(err: BaseException) -> list[BaseException]:
    out, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen and len(out) < 10:
        out.append(current)
        seen.add(id(current))
        current = current.__cause__  # `raise ... from`: the reason, not a handled side issue
    return out


def short_cause(err: BaseException, limit: int = 300) -> str:
    """The cause of `err` in one line (`OSError: No space left on device` rather than
    TensorStore's spec): the innermost exception it was raised from, cleaned up."""
    err = _chain(err)[-1]
    text = str(err)
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    elif "No space left on device" in text or "os_error_code='28'" in text:
        text = "No space left on device"
    text = _NOISE.sub("", text).strip()
    text = text.splitlines()[0] if text else type(err).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def failed_array(err: BaseException) -> str | None:
    """The array a TensorStore read error is about (`params/model/embed/embedding`), if named."""
    for link in reversed(_chain(err)):
        names = _ARRAY_PATH.findall(str(link))
        if names:
            return names[-1].replace(".", "/")
    return None
