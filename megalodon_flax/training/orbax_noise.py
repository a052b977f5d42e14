"""Keeping orbax's and TensorStore's output to what a user needs.

* orbax's INFO records (dozens per save) are dropped from the absl log;
* its ERROR records, which carry a TensorStore spec and a traceback each, are cut to one line
  (the failure itself reaches the caller as one `CheckpointError`), and so are asyncio's
  "exception was never retrieved" records of the reads and writes orbax abandons;
* the `RuntimeError: Event loop is closed` tracebacks that TensorStore callbacks raise (as
  unraisable or uncaught exceptions) when a write finishes after orbax abandoned a failed
  save are dropped: hundreds after a full disk.
"""

from __future__ import annotations

import logging as py_logging
import sys
from typing import Any

from megalodon_flax.training.checkpoint_files import short_cause


class _OrbaxFilter(py_logging.Filter):
    """Drops orbax's INFO records and shortens its errors to one line; warnings pass."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno < py_logging.WARNING:
            return False
        if record.levelno >= py_logging.ERROR:
            message = short_cause(RuntimeError(record.getMessage())).removeprefix("RuntimeError: ")
            record.msg, record.args = f"orbax: {message}", ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


class _AsyncioFilter(py_logging.Filter):
    """Cuts asyncio's error records (an unretrieved task exception and its traceback) to one
    line."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.ERROR and record.exc_info:
            first = record.getMessage().splitlines()[0]
            cause = short_cause(record.exc_info[1] or RuntimeError(first))
            record.msg, record.args = f"asyncio: {first}: {cause}", ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


_FILTER = _OrbaxFilter()
_ASYNCIO_FILTER = _AsyncioFilter()


def _is_closed_loop_noise(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _excepthook(previous: Any) -> Any:
    def hook(kind: type, value: BaseException, tb: Any) -> None:
        if not _is_closed_loop_noise(value):
            previous(kind, value, tb)

    hook.megalodon_quiet = True  # type: ignore[attr-defined]
    return hook


def _unraisablehook(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_noise(unraisable.exc_value):
            previous(unraisable)

    hook.megalodon_quiet = True  # type: ignore[attr-defined]
    return hook


def quiet_orbax_logs() -> None:
    """Installs the filters above (idempotent)."""
    logger = py_logging.getLogger("absl")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    logger = py_logging.getLogger("asyncio")
    if _ASYNCIO_FILTER not in logger.filters:
        logger.addFilter(_ASYNCIO_FILTER)
    if not getattr(sys.excepthook, "megalodon_quiet", False):
        sys.excepthook = _excepthook(sys.excepthook)
    if not getattr(sys.unraisablehook, "megalodon_quiet", False):
        sys.unraisablehook = _unraisablehook(sys.unraisablehook)
