"""Tests of the numpy input pipeline (megalodon_flax.data.pipeline): training and eval batches.

Oracles: the raw byte windows of the split at the offsets the pipeline reports, the same
iterator resumed from its JSON state, and the global batch against the union of the
per-process slices.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from megalodon_flax.data import pipeline


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ----------------------------------------------------------------------------- training batches


@pytest.fixture
def byte_array() -> np.ndarray:
    return np.frombuffer(_random_bytes(5_000, seed=3), np.uint8)


def _kwargs(**overrides: int) -> dict[str, int]:
    return {"seq_len": 16, "global_batch_size": 8, "seed": 7, **overrides}


def test_train_batches_match_raw_windows(byte_array: np.ndarray) -> None:
    seq_len, batch_size = 16, 8
    batch = next(pipeline.TrainIterator(byte_array, **_kwargs()))
    assert set(batch) == {"inputs", "targets", "weights"}
    assert batch["inputs"].shape == batch["targets"].shape == (batch_size, seq_len)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["weights"].dtype == np.float32 and np.all(batch["weights"] == 1)
    offsets = pipeline.train_offsets(
        byte_array.size, 0, seq_len=seq_len, global_batch_size=batch_size, seed=7
    )
    assert offsets.min() >= 0 and offsets.max() <= byte_array.size - seq_len - 1
    for row, offset in enumerate(offsets):
        np.testing.assert_array_equal(batch["inputs"][row], byte_array[offset : offset + seq_len])
        np.testing.assert_array_equal(
            batch["targets"][row], byte_array[offset + 1 : offset + seq_len + 1]
        )
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_train_batches_are_deterministic(byte_array: np.ndarray) -> None:
    first_it = pipeline.TrainIterator(byte_array, **_kwargs())
    second_it = pipeline.TrainIterator(byte_array, **_kwargs())
    first = [next(first_it) for _ in range(5)]
    second = [next(second_it) for _ in range(5)]
    for step, (a, b) in enumerate(zip(first, second, strict=True)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        direct = pipeline.train_batch(byte_array, step, **_kwargs())
        np.testing.assert_array_equal(a["targets"], direct["targets"])
    assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
    other_seed = next(pipeline.TrainIterator(byte_array, **_kwargs(seed=8)))
    assert not np.array_equal(first[0]["inputs"], other_seed["inputs"])


def test_train_iterator_resumes_from_json_state(byte_array: np.ndarray) -> None:
    it = pipeline.TrainIterator(byte_array, **_kwargs())
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"step": 3}
    continued = [next(it) for _ in range(4)]
    resumed_it = pipeline.TrainIterator(byte_array, **_kwargs(), state=state)
    resumed = [next(resumed_it) for _ in range(4)]
    for a, b in zip(continued, resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert resumed_it.get_state() == it.get_state() == {"step": 7}


def test_train_process_slices_union_to_global_batch(byte_array: np.ndarray) -> None:
    global_it = pipeline.TrainIterator(byte_array, **_kwargs())
    local_its = [
        pipeline.TrainIterator(byte_array, **_kwargs(), process_index=p, process_count=4)
        for p in range(4)
    ]
    assert all(it.local_batch_size == 2 for it in local_its)
    for _ in range(3):
        expected = next(global_it)
        parts = [next(it) for it in local_its]
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])


def test_train_iterator_errors(byte_array: np.ndarray) -> None:
    with pytest.raises(ValueError, match="shorter than seq_len"):
        pipeline.TrainIterator(byte_array[:16], **_kwargs())
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.TrainIterator(byte_array, **_kwargs(), process_count=3)
    with pytest.raises(ValueError, match="seq_len"):
        pipeline.TrainIterator(byte_array, **_kwargs(seq_len=0))
    # Exactly seq_len + 1 bytes is enough: every window is the whole split.
    batch = next(pipeline.TrainIterator(byte_array[:17], **_kwargs()))
    assert np.all(batch["inputs"] == byte_array[:16])


# ----------------------------------------------------------------------------- eval batches


@pytest.mark.parametrize(("num_bytes", "seq_len"), [(1_000, 7), (1_001, 8), (30, 64)])
def test_eval_windows_cover_split_once(num_bytes: int, seq_len: int) -> None:
    data = np.frombuffer(_random_bytes(num_bytes, seed=4), np.uint8)
    batch_size = 4
    batches = list(pipeline.eval_batches(data, seq_len=seq_len, global_batch_size=batch_size))
    assert len(batches) == pipeline.num_eval_batches(
        num_bytes, seq_len=seq_len, global_batch_size=batch_size
    )
    num_windows = -(-(num_bytes - 1) // seq_len)
    assert len(batches) == -(-num_windows // batch_size)
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    assert inputs.shape == targets.shape == weights.shape == (len(batches) * batch_size, seq_len)
    assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32

    # Every byte after the first is a weighted target exactly once, in order.
    mask = weights == 1
    assert np.all((weights == 0) | mask)
    np.testing.assert_array_equal(targets[mask], data[1:])
    np.testing.assert_array_equal(inputs[mask], data[:-1])
    assert mask.sum() == num_bytes - 1
    # Window i starts at byte i * seq_len; padding is zero.
    for i in range(num_windows):
        valid = int(mask[i].sum())
        assert valid == min(seq_len, num_bytes - 1 - i * seq_len)
        assert np.all(mask[i, :valid])
        np.testing.assert_array_equal(inputs[i, :valid], data[i * seq_len : i * seq_len + valid])
    assert not mask[num_windows:].any()
    assert np.all(inputs[~mask] == 0) and np.all(targets[~mask] == 0)


def test_eval_max_batches_and_processes() -> None:
    data = np.frombuffer(_random_bytes(2_000, seed=5), np.uint8)
    kwargs = {"seq_len": 10, "global_batch_size": 6}
    full = list(pipeline.eval_batches(data, **kwargs))
    limited = list(pipeline.eval_batches(data, **kwargs, max_batches=2))
    assert len(limited) == 2 < len(full)
    for a, b in zip(limited, full[:2], strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    parts = [
        list(pipeline.eval_batches(data, **kwargs, process_index=p, process_count=3))
        for p in range(3)
    ]
    assert all(len(p) == len(full) for p in parts)
    for step, expected in enumerate(full):
        for key in expected:
            joined = np.concatenate([p[step][key] for p in parts])
            np.testing.assert_array_equal(joined, expected[key])


def test_eval_errors() -> None:
    data = np.zeros(100, np.uint8)
    with pytest.raises(ValueError, match="nothing to predict"):
        list(pipeline.eval_batches(data[:1], seq_len=4, global_batch_size=2))
    with pytest.raises(ValueError, match="not divisible"):
        list(pipeline.eval_batches(data, seq_len=4, global_batch_size=3, process_count=2))
    with pytest.raises(ValueError, match="seq_len"):
        list(pipeline.eval_batches(data, seq_len=0, global_batch_size=2))


def test_prefetched_batches_are_the_steps_batches_and_the_state_counts_consumed_ones(
    byte_array: np.ndarray,
) -> None:
    """The background thread prepares batches ahead; what is yielded is still the batch of
    each step in order (`train_batch`, the direct computation), and the state names the
    next batch to be consumed, not the next one prepared."""
    it = pipeline.TrainIterator(byte_array, prefetch=4, **_kwargs())
    got = [next(it) for _ in range(3)]
    assert it.get_state() == {"step": 3}
    for step, batch in enumerate(got):
        want = pipeline.train_batch(byte_array, step, **_kwargs())
        for key in want:
            np.testing.assert_array_equal(batch[key], want[key])
    resumed = pipeline.TrainIterator(byte_array, prefetch=0, state=it.get_state(), **_kwargs())
    np.testing.assert_array_equal(next(resumed)["inputs"], next(it)["inputs"])
    it.close()
    resumed.close()


def test_eval_windows_with_segment_ids_score_no_pair_across_documents() -> None:
    """Brute force over every window position: a target counts when it exists and is in the
    input's document; the inputs' segment ids are the documents (0 without a target)."""
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, 61).astype(np.uint8)
    ids = np.repeat(np.arange(1, 8), [3, 12, 1, 9, 20, 4, 12])
    seq_len, rows = 8, 3
    plain = list(pipeline.eval_batches(data, seq_len=seq_len, global_batch_size=rows))
    packed = list(
        pipeline.eval_batches(data, seq_len=seq_len, global_batch_size=rows, segment_ids=ids)
    )
    assert len(plain) == len(packed)
    for b, (p, q) in enumerate(zip(plain, packed, strict=True)):
        assert "segment_ids" not in p
        np.testing.assert_array_equal(p["inputs"], q["inputs"])
        np.testing.assert_array_equal(p["targets"], q["targets"])
        for r in range(rows):
            for t in range(seq_len):
                i = (b * rows + r) * seq_len + t  # the input's index in the split
                has_target = i + 1 < data.size
                same = has_target and ids[i] == ids[i + 1]
                assert q["weights"][r, t] == float(same), (b, r, t)
                assert q["segment_ids"][r, t] == (ids[i] if has_target else 0)
    scored = sum(q["weights"].sum() for q in packed)
    assert scored == data.size - 7  # every target but the first token of each document
    with pytest.raises(ValueError, match="segment_ids must be positive"):
        next(pipeline.eval_batches(data, seq_len=8, global_batch_size=3, segment_ids=ids[:-1]))
