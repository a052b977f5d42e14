"""TensorBoard's own event reader (`EventAccumulator`), the oracle for the package's decoder
(`megalodon_flax.event_files`) and for the numbers the run report shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _accumulator(path: Path):
    """A loaded `EventAccumulator` of one event file, every tensor event kept."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return acc


def files(workdir: Path) -> list[Path]:
    """Event files of `workdir`, oldest first by the wall time of their first summary.

    The name's time field and the file-version event have whole seconds only, and a process
    opens several writers within one second here.
    """

    def start(path: Path) -> float:
        acc = _accumulator(path)
        return min(e.wall_time for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag))

    return sorted(Path(workdir).glob("events.out.tfevents.*"), key=start)


def _tensors(workdir: Path, tag: str) -> Iterator[tuple[int, np.ndarray]]:
    """`(step, ndarray)` of every `tag` event, file by file, via TensorBoard's accumulator."""
    from tensorboard.util import tensor_util

    for path in files(workdir):
        acc = _accumulator(path)
        if tag in acc.Tags()["tensors"]:
            for event in acc.Tensors(tag):
                yield event.step, tensor_util.make_ndarray(event.tensor_proto)


def scalars(workdir: Path, tag: str) -> dict[int, float]:
    """`{step: value}` of a scalar, the later file winning (TensorBoard's reader)."""
    return {step: float(value) for step, value in _tensors(workdir, tag)}


def texts(workdir: Path, tag: str = "sample") -> dict[int, str]:
    """`{step: text}` of a text summary (TensorBoard's reader)."""
    return {
        step: np.asarray(value).reshape(-1)[0].decode("utf-8")
        for step, value in _tensors(workdir, tag)
    }


def wall_time(workdir: Path) -> float:
    """First to last event of each file, through tensorboard's accumulator."""
    total = 0.0
    for path in files(workdir):
        acc = _accumulator(path)
        last = max(e.wall_time for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag))
        total += last - acc.FirstEventTimestamp()
    return total
