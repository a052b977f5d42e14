"""The packed rows shared by the packing tests: two rows of 45 tokens.

With chunks of 8 the layout packs documents shorter than a chunk, documents that start
mid-chunk and span several chunks, a one-token document, an id reused by two runs that do
not touch (different documents), a document cut at the row's end and a padding tail.
"""

from __future__ import annotations

import numpy as np

# Run lengths and ids per row (id 0 = padding); the rows are 45 long.
ROWS = (
    ((3, 1), (13, 2), (1, 3), (20, 1), (8, 4)),  # the last document is cut at the row's end
    ((9, 7), (26, 8), (10, 0)),  # a padding tail
)
L = 45


def _ids() -> np.ndarray:
    rows = []
    for runs in ROWS:
        row = np.concatenate([np.full(n, i, np.int32) for n, i in runs])
        assert row.size == L
        rows.append(row)
    return np.stack(rows)


def _documents(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document run, by a loop over the ids."""
    docs = []
    for b, row in enumerate(ids):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[t - 1]:
                if row[start] > 0:
                    docs.append((b, start, t))
                start = t
    return docs


IDS = _ids()
DOCS = _documents(IDS)


def packed_tokens() -> np.ndarray:
    """Random tokens (2, 45) of a vocabulary of 64."""
    return np.random.default_rng(7).integers(0, 64, size=IDS.shape).astype(np.int32)


def documents_alone(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every document in a row of its own from position 0, right-padded: tokens and mask."""
    longest = max(end - start for _, start, end in DOCS)
    rows = np.zeros((len(DOCS), longest), np.int32)
    mask = np.zeros((len(DOCS), longest), bool)
    for i, (b, start, end) in enumerate(DOCS):
        rows[i, : end - start] = tokens[b, start:end]
        mask[i, : end - start] = True
    return rows, mask
