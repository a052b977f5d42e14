"""Packed training rows from a document source, through Grain.

The pipeline (per process):

  documents[process_index::process_count]    this process's share of the corpus
  → shuffle(seed), reshuffled every epoch      `MapDataset.shuffle(...).repeat(None)`
  → tokenize                                   bytes → int32 token ids; empty ones dropped
  → concat-then-split into rows of L + 1       `grain.experimental.ConcatThenSplitIterDataset`
  → batch of B rows, weights and segment ids
  → prefetch in a background thread            `ThreadPrefetchIterDataset`

Rows are full: documents are concatenated and cut every L + 1 tokens, so a document longer
than what is left of a row continues at the start of the next row as a new run (the model
resets its state there; the pair across the row boundary is never a target). Each batch is

* `inputs`, `targets`: int32 (B, L), tokens t and t + 1 of the row;
* `segment_ids`: int32 (B, L), the run of each input token (1, 2, ... within a row);
* `weights`: float32 (B, L), 0 for the target that starts the next document.

The iterator's state (`get_state`, JSON) is Grain's plus the corpus size, so a resumed run
continues with exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from megalodon_flax.data.documents import CorpusError
from megalodon_flax.data.pipeline import Batch, GrainBatches
from megalodon_flax.data.tokenization import ByteTokenizer
from megalodon_flax.layers.segments import packed_target_weights

Tokenize = Callable[[bytes], np.ndarray]
STATE_KEY = "packed"
BYTES = ByteTokenizer()


def rows_to_batch(tokens: np.ndarray, row_segment_ids: np.ndarray) -> Batch:
    """Rows (B, L + 1) of tokens and their segment ids → the training batch (B, L)."""
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1], np.int32),
        "targets": np.ascontiguousarray(tokens[:, 1:], np.int32),
        "segment_ids": np.ascontiguousarray(row_segment_ids[:, :-1], np.int32),
        "weights": np.asarray(packed_target_weights(row_segment_ids), np.float32),
    }


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenize: Tokenize) -> None:
        self.tokenize = tokenize

    def map(self, document: bytes) -> dict[str, np.ndarray]:
        return {"tokens": np.asarray(self.tokenize(document), np.int32)}


def packed_dataset(
    documents: Sequence[bytes],
    *,
    seq_len: int,
    local_batch_size: int,
    seed: int,
    tokenize: Tokenize = BYTES.encode,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """The Grain dataset of packed batches (see the module docstring)."""
    if seq_len < 1 or local_batch_size < 1:
        raise ValueError(f"seq_len and batch size must be >= 1, got {seq_len}, {local_batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if len(documents) < process_count:
        raise CorpusError(
            f"{len(documents)} documents cannot be shared among {process_count} processes"
        )
    ds = grain.MapDataset.source(documents)[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat(None).map(_Tokenize(tokenize))
    ds = ds.filter(lambda element: element["tokens"].size > 0).to_iter_dataset()
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds.map(lambda rows: rows_to_batch(rows["tokens"], rows["tokens_segment_ids"]))
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


class PackedTrainIterator(GrainBatches):
    """Endless packed training batches, resumable from `get_state()` (JSON).

    Args:
      documents: the training documents (`len`, indexing → bytes).
      seq_len: L; rows hold L + 1 tokens.
      global_batch_size: rows per step over all processes, divisible by `process_count`.
      seed: shuffling seed.
      tokenize: bytes → int32 ids.
      process_index, process_count: this process's share of documents and rows.
      prefetch: batches prepared ahead by a background thread (0: none).
      state: a `get_state()` to resume from.
    """

    def __init__(
        self,
        documents: Sequence[bytes],
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        tokenize: Tokenize = BYTES.encode,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by process_count "
                f"{process_count}"
            )
        self.num_documents = len(documents)
        dataset = packed_dataset(
            documents,
            seq_len=seq_len,
            local_batch_size=global_batch_size // process_count,
            seed=seed,
            tokenize=tokenize,
            process_index=process_index,
            process_count=process_count,
            prefetch=prefetch,
        )
        self._iterator = iter(dataset)
        if state is not None:
            self.set_state(state)

    def get_state(self) -> dict[str, Any]:
        """The position as JSON types (Grain's state holds tuples)."""
        state = {STATE_KEY: self._iterator.get_state(), "num_documents": self.num_documents}
        return json.loads(json.dumps(state))

    def set_state(self, state: Mapping[str, Any]) -> None:
        if STATE_KEY not in state:
            raise ValueError(
                "the checkpoint's data position is not a packed pipeline's (it was saved by "
                f"another data.source or data.documents): {dict(state)}"
            )
        if state["num_documents"] != self.num_documents:
            raise ValueError(
                f"the corpus changed since the checkpoint: {state['num_documents']} training "
                f"documents then, {self.num_documents} now"
            )
        self._iterator.set_state(state[STATE_KEY])
