"""A training run read back from its workdir: config.json and every TensorBoard event file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from megalodon_flax.event_files import EVENT_GLOB, event_files, read_event_file


@dataclasses.dataclass
class RunSummary:
    """Everything read from one training workdir.

    Attributes:
        name: Label of the run in the report.
        workdir: The run's directory.
        config: The parsed `config.json` (empty when the file is missing).
        scalars: `{tag: {step: value}}` of every scalar, merged over the event files.
        texts: `{tag: {step: text}}` of every text summary (e.g. `sample`).
        first_window_steps: `{tag: steps}`: the first step each process logged a tag at. For
            the per-window timings this window includes compilation.
        wall_time_s: Seconds between the first and last event of each event file, summed over
            the files (None without timestamped events).
    """

    name: str
    workdir: Path
    config: dict[str, Any]
    scalars: dict[str, dict[int, float]]
    texts: dict[str, dict[int, str]]
    first_window_steps: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    wall_time_s: float | None = None

    def series(self, tag: str) -> dict[int, float]:
        """`{step: value}` of a scalar, empty if the run never logged it."""
        return self.scalars.get(tag, {})

    @property
    def model_family(self) -> str | None:
        """`config.model_family`; runs from before that field are Megalodon runs."""
        if not self.config:
            return None
        return str(self.config.get("model_family") or "megalodon")

    @property
    def num_params(self) -> int | None:
        """Parameter count logged at the start of training."""
        values = self.series("num_params")
        return round(values[max(values)]) if values else None

    @property
    def last_step(self) -> int | None:
        """Highest step of any logged scalar or text."""
        steps = [s for d in (*self.scalars.values(), *self.texts.values()) for s in d]
        return max(steps) if steps else None

    def final(self, tag: str) -> tuple[int, float] | None:
        """`(step, value)` of a scalar at its last logged step."""
        values = self.series(tag)
        if not values:
            return None
        step = max(values)
        return step, values[step]

    def best(self, tag: str) -> tuple[int, float] | None:
        """`(step, value)` of the smallest value of a scalar (the earliest step on ties)."""
        values = self.series(tag)
        if not values:
            return None
        step = min(values, key=lambda s: (values[s], s))
        return step, values[step]

    def steady_median(self, tag: str) -> float | None:
        """Median of a per-window scalar without each process's first (compiling) window.

        Falls back to all values when nothing else is left.
        """
        values = self.series(tag)
        if not values:
            return None
        first = self.first_window_steps.get(tag, set())
        steady = [v for s, v in values.items() if s not in first]
        return statistics.median(steady or values.values())

    @property
    def peak_memory_mb(self) -> float | None:
        """Largest `peak_memory_mb` logged."""
        values = self.series("peak_memory_mb")
        return max(values.values()) if values else None

    @property
    def train_time_s(self) -> float | None:
        """Training seconds: `seconds_per_step` × the steps of its window, summed.

        A window runs from the previous logged step (0 for the first) to the logged step. This
        counts train steps only (compilation included; evaluation, sampling and checkpoints not).
        """
        values = self.series("seconds_per_step")
        if not values:
            return None
        total, previous = 0.0, 0
        for step in sorted(values):
            total += values[step] * (step - previous)
            previous = step
        return total

    @property
    def last_sample(self) -> tuple[int, str] | None:
        """`(step, text)` of the last `sample` text."""
        texts = self.texts.get("sample", {})
        if not texts:
            return None
        step = max(texts)
        return step, texts[step]


def load_run(workdir: str | os.PathLike, name: str | None = None) -> RunSummary:
    """Reads the config and every event file of a training workdir.

    Files are applied in the order they were started, so a resumed run's value for a step
    replaces the older one.

    Args:
        workdir: The run's directory.
        name: Label of the run; default: the directory's name.

    Raises:
        FileNotFoundError: If `workdir` does not exist or holds no event files.
    """
    path = Path(workdir)
    if not path.is_dir():
        raise FileNotFoundError(f"workdir {str(path)!r} does not exist or is not a directory")
    files = event_files(path)
    if not files:
        raise FileNotFoundError(
            f"no TensorBoard event files ({EVENT_GLOB}) in workdir {str(path)!r}"
        )
    parsed = [read_event_file(f) for f in files]  # in the order their writers started
    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, dict[int, str]] = {}
    first_window: dict[str, set[int]] = {}
    wall_time = 0.0
    has_wall_time = False
    for events in parsed:
        first_in_file: dict[str, int] = {}
        for tag, step, value in events.scalars:
            scalars.setdefault(tag, {})[step] = value
            first_in_file[tag] = min(step, first_in_file.get(tag, step))
        for tag, step, text in events.texts:
            texts.setdefault(tag, {})[step] = text
        for tag, step in first_in_file.items():
            first_window.setdefault(tag, set()).add(step)
        if math.isfinite(events.first_wall_time):
            wall_time += events.last_wall_time - events.first_wall_time
            has_wall_time = True

    config: dict[str, Any] = {}
    config_path = path / "config.json"
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text())
        except (OSError, ValueError):
            loaded = None
        if isinstance(loaded, dict):
            config = loaded
    return RunSummary(
        name=name or path.resolve().name,
        workdir=path,
        config=config,
        scalars=scalars,
        texts=texts,
        first_window_steps=first_window,
        wall_time_s=wall_time if has_wall_time else None,
    )
