"""Packed rows: several documents in one row, told apart by segment ids (spec §5.7).

`segment_ids` (B, L) int: 0 marks padding, a positive id a document. A run starts at
position 0 and wherever the id changes (equal ids in runs that do not touch are different
documents). Every component resets at a run start, so each document of a packed row is
computed as if it were alone; `Segments` carries what they need, computed once per call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from megalodon_flax.layers.input_checks import is_traced


@struct.dataclass
class Segments:
    """The run layout of packed rows, each field (B, L).

    valid: bool, the token belongs to a document (id > 0).
    starts: bool, a run starts here (position 0 or the id changed).
    position: int32, position within the run (0 at its start).
    """

    valid: jax.Array
    starts: jax.Array
    position: jax.Array

    @property
    def run_start(self) -> jax.Array:
        """(B, L) int32: the row position where each token's run starts."""
        return jnp.arange(self.position.shape[1], dtype=jnp.int32) - self.position


def segments_from_ids(segment_ids: jax.Array) -> Segments:
    """The run layout of `segment_ids` (B, L) int (checked by `check_segment_ids`)."""
    length = segment_ids.shape[1]
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), changed], axis=1)
    index = jnp.arange(length, dtype=jnp.int32)
    run_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return Segments(valid=segment_ids > 0, starts=starts, position=index - run_start)


def check_segment_ids(segment_ids: Any, tokens_shape: tuple[int, ...]) -> jax.Array:
    """Validates segment ids and returns them as int32 (B, L).

    Raises:
      ValueError: a shape other than the tokens', a non-integer dtype, or (concrete ids
        only) a negative id.
    """
    if not hasattr(segment_ids, "dtype"):
        segment_ids = jnp.asarray(segment_ids)
    if tuple(segment_ids.shape) != tuple(tokens_shape):
        raise ValueError(
            f"segment_ids shape {tuple(segment_ids.shape)} != tokens shape {tuple(tokens_shape)}"
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"segment_ids must be integers (0 = padding, > 0 = document), got dtype "
            f"{segment_ids.dtype}"
        )
    if not is_traced(segment_ids):
        host = np.asarray(segment_ids)
        if (host < 0).any():
            row, pos = (int(i) for i in np.argwhere(host < 0)[0])
            raise ValueError(
                f"segment_ids must be >= 0 (0 = padding), got {host[row, pos]} at (row {row}, "
                f"position {pos})"
            )
    return jnp.asarray(segment_ids, jnp.int32)


def packed_target_weights(segment_ids: jax.Array) -> jax.Array:
    """Loss weights of packed windows: segment ids (..., L + 1) of the window's tokens →
    (..., L) float32, 1 where target t + 1 is a document token of the same run as input t.

    Padding targets and the pair that straddles two runs weigh 0. NumPy ids give a NumPy
    array (the input pipeline builds its batches with it).
    """
    inputs, targets = segment_ids[..., :-1], segment_ids[..., 1:]
    return ((targets > 0) & (targets == inputs)).astype(np.float32)
