"""Reading TensorBoard event files without TensorFlow (TensorBoard's protocol buffers only).

clu's summary writer stores scalars and texts as tensors; `read_event_file` decodes both.
A file cut short by a killed writer yields the records before the cut.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

EVENT_GLOB = "events.out.tfevents.*"


def _records(path: Path) -> Iterator[bytes]:
    """Payloads of a TFRecord file; a truncated last record (a killed writer) ends the file.

    Each record is a little-endian uint64 length, its 4-byte checksum, the payload and the
    payload's 4-byte checksum. The checksums are not verified: the event parser rejects garbage.
    """
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            if len(payload) < length or len(f.read(4)) < 4:
                return
            yield payload


def _decode_value(value: Any) -> float | str | None:
    """A float for a scalar, a str for a text, None for anything else (e.g. hparams)."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind != "tensor":
        return None
    from tensorboard.util import tensor_util

    try:
        array = np.asarray(tensor_util.make_ndarray(value.tensor))
    except (TypeError, ValueError):
        return None
    if array.size != 1:
        return None
    item = array.reshape(-1)[0]
    if isinstance(item, bytes):
        return item.decode("utf-8", errors="replace")
    if isinstance(item, str):
        return item
    if np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_:
        return float(item)
    return None


@dataclasses.dataclass
class EventFile:
    """The values of one event file, in write order."""

    path: Path
    first_wall_time: float
    last_wall_time: float
    scalars: list[tuple[str, int, float]]
    texts: list[tuple[str, int, str]]


def read_event_file(path: Path) -> EventFile:
    from tensorboard.compat.proto import event_pb2

    scalars: list[tuple[str, int, float]] = []
    texts: list[tuple[str, int, str]] = []
    wall_times: list[float] = []
    for payload in _records(path):
        try:
            event = event_pb2.Event.FromString(payload)
        except Exception:  # a damaged record: keep what was read before it
            break
        if event.wall_time:
            wall_times.append(event.wall_time)
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            decoded = _decode_value(value)
            if isinstance(decoded, str):
                texts.append((value.tag, event.step, decoded))
            elif decoded is not None:
                scalars.append((value.tag, event.step, decoded))
    first = min(wall_times) if wall_times else math.inf
    last = max(wall_times) if wall_times else math.inf
    return EventFile(path, first, last, scalars, texts)


def event_files(workdir: str | os.PathLike) -> list[Path]:
    """The event files directly inside `workdir`, in the order their writers started."""
    files = [p for p in Path(workdir).glob(EVENT_GLOB) if p.is_file()]
    return sorted(files, key=_start_time)


def _start_time(path: Path) -> tuple[float, tuple[int | str, ...]]:
    """The wall time of a file's first record (sub-second, written when its writer opened),
    then the numbers in its name (`events.out.tfevents.<time>.<host>.<pid>.<counter>.v2`)
    compared as numbers, so that writers opened within the same second keep their order."""
    from tensorboard.compat.proto import event_pb2

    first = math.inf
    for payload in _records(path):
        with contextlib.suppress(Exception):  # a damaged first record: order by the name
            first = event_pb2.Event.FromString(payload).wall_time or math.inf
        break
    parts = tuple(int(p) if p.isdigit() else p for p in path.name.split("."))
    return first, tuple((0, p) if isinstance(p, int) else (1, p) for p in parts)


def read_scalars(
    workdir: str | os.PathLike, tag: str, files: list[Path] | None = None
) -> dict[int, float]:
    """`{step: value}` of a scalar over the event files of `workdir` (or only `files`), the
    later file winning for a step written twice (a resumed run)."""
    out: dict[int, float] = {}
    for path in event_files(workdir) if files is None else files:
        out.update((step, value) for t, step, value in read_event_file(path).scalars if t == tag)
    return out


def read_texts(workdir: str | os.PathLike, tag: str = "sample") -> dict[int, str]:
    """`{step: text}` of a text summary over the event files of `workdir`."""
    out: dict[int, str] = {}
    for path in event_files(workdir):
        out.update((step, text) for t, step, text in read_event_file(path).texts if t == tag)
    return out
