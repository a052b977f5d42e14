"""An exclusive lock on a training workdir: `<workdir>/.lock`, held with `fcntl.flock`.

The lock file holds the holder's pid, host and start time (JSON), which a second run names
in its error. The kernel releases a `flock` when its process ends, however it ends, so a
lock file left behind by a killed run never blocks the next one. In a multi-process run
only process 0 takes the lock; the verdict is broadcast so every process stops together.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator

import jax
import numpy as np
from etils import epath

from megalodon_flax.training.errors import WorkdirLockedError

LOCK_FILENAME = ".lock"


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
        f"{info.get('started', '?')}"
    )


class WorkdirLock:
    """The lock of one workdir, held from `acquire()` until `release()` or process exit."""

    def __init__(self, workdir: epath.PathLike):
        self.path = epath.Path(os.path.abspath(os.fspath(workdir))) / LOCK_FILENAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock or raises `WorkdirLockedError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise WorkdirLockedError(
                    f"cannot lock the workdir {self.path.parent} ({self.path}: {err.strerror})"
                ) from None
            raise WorkdirLockedError(
                f"the workdir {self.path.parent} is in use by another training run ({holder}); "
                "wait for it to finish or use another --workdir"
            ) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (the file stays: removing it would race with a new holder)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def locked(workdir: epath.PathLike) -> Iterator[None]:
    """Holds the workdir's lock for the duration (process 0 takes it; all processes stop if
    it is taken)."""
    lock = WorkdirLock(workdir)
    message = ""
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLockedError as err:
            message = str(err)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(bool(message)))
        if int(failed) and not message:
            message = f"the workdir {lock.path.parent} is in use by another training run"
    if message:
        raise WorkdirLockedError(message)
    try:
        yield
    finally:
        lock.release()
