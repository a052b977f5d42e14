"""Numpy batches of byte windows for language-model training and evaluation.

Every batch is a dict of numpy arrays, for a local batch of `B` rows and `L = seq_len`:

* `inputs`: int32 `(B, L)`, bytes `x[t]`;
* `targets`: int32 `(B, L)`, the next bytes `x[t + 1]`;
* `weights`: float32 `(B, L)`, 1 where the target is real and 0 on padding.

Windows hold `seq_len + 1` consecutive bytes. Training draws them at random offsets that depend
only on `(seed, step)`, so the iterator state is just the step; `TrainIterator` runs them
through Grain with background prefetch. Evaluation tiles the split with
windows starting at `i * seq_len`, so that every byte after the first is a target exactly once.
For multi-process data parallelism every process computes the same global batch and keeps its
own contiguous block of `global_batch_size // process_count` rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from megalodon_flax.layers.segments import packed_target_weights

Batch = dict[str, np.ndarray]
# Steps a training iterator can count to (Grain ranges are finite).
MAX_STEPS = 1 << 62


def _check_data(data: np.ndarray) -> None:
    if not isinstance(data, np.ndarray) or data.ndim != 1:
        raise ValueError(f"data must be a 1-D numpy array of bytes, got {type(data)}.")
    if not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"data must hold integers (bytes), got dtype {data.dtype}.")


def _check_batching(
    seq_len: int, global_batch_size: int, process_index: int, process_count: int
) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count, got {process_index} and {process_count}."
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}."
        )


def _local_rows(rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Returns this process's contiguous block of the global batch rows."""
    per_process = rows.shape[0] // process_count
    return rows[process_index * per_process : (process_index + 1) * per_process]


def _to_batch(windows: np.ndarray, weights: np.ndarray) -> Batch:
    """Splits windows `(B, L + 1)` into inputs/targets `(B, L)`, with weights `(B, L)`."""
    windows = windows.astype(np.int32)
    return {
        "inputs": np.ascontiguousarray(windows[:, :-1]),
        "targets": np.ascontiguousarray(windows[:, 1:]),
        "weights": weights.astype(np.float32),
    }


def train_offsets(
    num_bytes: int, step: int, *, seq_len: int, global_batch_size: int, seed: int
) -> np.ndarray:
    """Returns the start offsets of the global training batch of `step`.

    Args:
        num_bytes: Length of the training split.
        step: Training step (>= 0); each step has its own independent random stream.
        seq_len: Model sequence length; windows hold `seq_len + 1` bytes.
        global_batch_size: Rows of the global batch.
        seed: Non-negative data seed.

    Returns:
        int64 array `(global_batch_size,)` of offsets in `[0, num_bytes - seq_len - 1]`.
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed=} and {step=}.")
    if num_bytes < seq_len + 1:
        raise ValueError(f"Split of {num_bytes} bytes is shorter than seq_len + 1 = {seq_len + 1}.")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(step,)))
    return rng.integers(0, num_bytes - seq_len, size=global_batch_size, dtype=np.int64)


def train_batch(
    data: np.ndarray,
    step: int,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Batch:
    """Returns this process's part of the training batch of `step`.

    Args:
        data: 1-D array `(num_bytes,)` of the training split.
        step: Training step (>= 0).
        seq_len: Model sequence length `L`.
        global_batch_size: Rows of the global batch, divisible by `process_count`.
        seed: Non-negative data seed.
        process_index: Index of this process.
        process_count: Number of processes feeding data.

    Returns:
        `{'inputs', 'targets'}` int32 `(B, L)` and `weights` float32 `(B, L)` of ones, with
        `B = global_batch_size // process_count`: rows `[process_index * B, (process_index + 1)
        * B)` of the global batch.
    """
    _check_data(data)
    _check_batching(seq_len, global_batch_size, process_index, process_count)
    offsets = train_offsets(
        data.shape[0], step, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed
    )
    offsets = _local_rows(offsets, process_index, process_count)
    windows = np.lib.stride_tricks.sliding_window_view(data, seq_len + 1)[offsets]
    return _to_batch(windows, np.ones((offsets.shape[0], seq_len), np.float32))


class GrainBatches:
    """Batches from a Grain dataset iterator (`self._iterator`), with `close()` for its
    prefetch thread."""

    _iterator: Any

    def __iter__(self) -> GrainBatches:
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def close(self) -> None:
        """Stops the prefetch thread."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()
        del iterator  # collected now, not at interpreter exit when Grain's modules are gone


class TrainIterator(GrainBatches):
    """Endless iterator of training batches (see `train_batch`), resumable from its state.

    A Grain pipeline: `MapDataset.range` over the steps, each mapped to its batch, prepared
    `prefetch` batches ahead by a background thread. The state is `{'step': k}`, where `k`
    is the step of the next batch; it round-trips through JSON, and an iterator restored
    from it yields the same batches as the original.
    """

    def __init__(
        self,
        data: np.ndarray,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        """Initializes the iterator.

        Args:
            data: 1-D array `(num_bytes,)` of the training split, `num_bytes >= seq_len + 1`.
            seq_len: Model sequence length `L`.
            global_batch_size: Rows of the global batch, divisible by `process_count`.
            seed: Non-negative data seed.
            process_index: Index of this process.
            process_count: Number of processes feeding data.
            prefetch: Batches prepared ahead by a background thread (0: none).
            state: A state from `get_state()` to resume from; `None` starts at step 0.

        Raises:
            ValueError: On a split shorter than `seq_len + 1`, `seq_len < 1`, or a batch size
                not divisible by `process_count`.
        """
        _check_data(data)
        _check_batching(seq_len, global_batch_size, process_index, process_count)
        if data.shape[0] < seq_len + 1:
            raise ValueError(
                f"Training split of {data.shape[0]} bytes is shorter than seq_len + 1 = "
                f"{seq_len + 1}."
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count

        def batch_of(step: int) -> Batch:
            return train_batch(
                data,
                step,
                seq_len=seq_len,
                global_batch_size=global_batch_size,
                seed=seed,
                process_index=process_index,
                process_count=process_count,
            )

        dataset = grain.MapDataset.range(MAX_STEPS).map(batch_of).to_iter_dataset()
        if prefetch > 0:
            dataset = grain.experimental.ThreadPrefetchIterDataset(
                dataset, prefetch_buffer_size=prefetch
            )
        self._iterator = iter(dataset)
        if state is not None:
            self.set_state(state)

    @property
    def local_batch_size(self) -> int:
        """Rows per batch yielded on this process."""
        return self.global_batch_size // self.process_count

    def get_state(self) -> dict[str, int]:
        """Returns the JSON-serializable state `{'step': next_step}`."""
        return {"step": int(self._iterator.get_state()["next_index"])}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resumes from a state returned by `get_state()`."""
        if "step" not in state:
            raise ValueError(
                "the checkpoint's data position is not a byte-window iterator's (it was saved "
                f"by another data.source or data.documents): {dict(state)}"
            )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"Invalid iterator state {dict(state)}.")
        self._iterator.set_state({"next_index": step})


def num_eval_windows(num_bytes: int, seq_len: int) -> int:
    """Returns the number of evaluation windows tiling a split of `num_bytes` bytes."""
    return math.ceil(max(num_bytes - 1, 0) / seq_len)


def num_eval_batches(
    num_bytes: int, *, seq_len: int, global_batch_size: int, max_batches: int | None = None
) -> int:
    """Returns how many batches `eval_batches` yields for a split of `num_bytes` bytes."""
    n = math.ceil(num_eval_windows(num_bytes, seq_len) / global_batch_size)
    return n if max_batches is None else min(n, max_batches)


def eval_batches(
    data: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    max_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    segment_ids: np.ndarray | None = None,
) -> Iterator[Batch]:
    """Yields contiguous, non-overlapping evaluation windows covering the split.

    Window `i` holds bytes `[i * seq_len, i * seq_len + seq_len + 1)`, so the targets of all
    windows are bytes `1 .. num_bytes - 1`, each once. The last window is zero-padded on the
    right and the last batch is filled with all-padding rows; padded positions have inputs,
    targets and weights 0. Every process yields the same number of batches.

    Args:
        data: 1-D array `(num_bytes,)` of the split, `num_bytes >= 2`.
        seq_len: Model sequence length `L`.
        global_batch_size: Rows of the global batch, divisible by `process_count`.
        max_batches: Stop after this many batches (`None`: cover the whole split).
        process_index: Index of this process.
        process_count: Number of processes feeding data.
        segment_ids: `(num_bytes,)` int, the document of each token (> 0), for a split of
            concatenated documents: every window then carries `segment_ids` and scores no
            target in another document than its input, so each document is read from a
            fresh state.

    Yields:
        `{'inputs', 'targets'}` int32 `(B, L)` and `weights` float32 `(B, L)`, with
        `B = global_batch_size // process_count`; with `segment_ids`, also `segment_ids`
        int32 `(B, L)` of the inputs (0 where the input has no target).
    """
    _check_data(data)
    _check_batching(seq_len, global_batch_size, process_index, process_count)
    num_bytes = data.shape[0]
    if segment_ids is not None and (segment_ids.shape != data.shape or not np.all(segment_ids > 0)):
        raise ValueError(
            f"segment_ids must be positive ids of shape {data.shape}, got {segment_ids.shape}"
        )
    if num_bytes < 2:
        raise ValueError(f"Evaluation split of {num_bytes} bytes has nothing to predict.")
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 or None, got {max_batches}.")
    positions = np.arange(seq_len + 1)
    for b in range(
        num_eval_batches(
            num_bytes, seq_len=seq_len, global_batch_size=global_batch_size, max_batches=max_batches
        )
    ):
        rows = np.arange(b * global_batch_size, (b + 1) * global_batch_size)
        rows = _local_rows(rows, process_index, process_count)
        index = rows[:, None] * seq_len + positions  # (B, L + 1) byte indices
        # A position counts when its target byte exists. Rows past the last window start at or
        # beyond byte num_bytes - 1, so this also blanks the filler rows of the last batch.
        weights = index[:, 1:] < num_bytes
        clipped = np.minimum(index, num_bytes - 1)
        windows = data[clipped].astype(np.int32)
        batch = {"inputs": windows[:, :-1] * weights, "targets": windows[:, 1:] * weights}
        if segment_ids is not None:
            ids = segment_ids[clipped].astype(np.int32)
            weights = weights & (packed_target_weights(ids) > 0)
            batch["segment_ids"] = np.where(index[:, 1:] < num_bytes, ids[:, :-1], 0)
        batch["weights"] = weights.astype(np.float32)
        yield batch
