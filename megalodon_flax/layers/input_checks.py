"""Checks of a language model's inputs: token ids, the attention mask and the cache.

Family-agnostic: `MegalodonLM`, `LlamaLM` and `sampling.generate` share these, so a token id
is judged by one rule wherever it enters.

Two kinds of check:

* On values (token ids in [0, V), a 0/1 right-padding mask, a cache with room for the
  call): they run when the input is concrete (eager `model.apply`, `generate`'s prompt) and
  raise a `ValueError`. Under `jax.jit` (or any trace) the values are unknown when the
  Python code runs, so they cannot raise. The models then set to NaN the logits of exactly
  the affected positions (an out-of-range id's own position; every position of a row whose
  mask is not 0/1 right padding; every position of a call that overflows a KV buffer), and
  an out-of-range id embeds as a zero vector, so it never reaches other positions as NaN:
  earlier positions are unchanged (up to the float rounding of an FFT path), later ones see
  a blank token. NaN logits make the loss of such a batch NaN, which the training loop's
  non-finite check stops on. Callers that jit can run `check_token_range` and
  `check_attention_mask` on their host batches first.
* On shapes and dtypes (the cache's structure against the config and the batch): these
  are static, so they raise under jit too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_attention_mask",
    "check_cache_leaves",
    "check_token_array",
    "check_token_range",
    "in_vocabulary",
    "is_traced",
    "mark_invalid",
]

_KINDS = (
    ("bool", jnp.bool_),
    ("integer", jnp.integer),
    ("complex", jnp.complexfloating),
    ("floating", jnp.floating),
)


def is_traced(x: Any) -> bool:
    """Whether `x` is an abstract value inside a trace (its values are unknown)."""
    return isinstance(x, jax.core.Tracer)


# ---------------------------------------------------------------------------- token ids
def check_token_array(tokens: Any, name: str = "tokens") -> jax.Array:
    """`tokens` as an integer array (B, L) with L >= 1, or a ValueError naming what is wrong.

    Shapes and dtypes only (works under jit); the id range is `check_token_range`'s.
    """
    if not hasattr(tokens, "dtype"):
        tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an integer array of shape (B, L), got "
            f"{tokens.dtype}{tuple(tokens.shape)}"
        )
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one position (L >= 1), got shape (B, 0)")
    return tokens


def check_token_range(tokens: Any, vocab_size: int, name: str = "tokens") -> None:
    """Raises a ValueError if a concrete `tokens` (any shape, int) holds an id outside
    [0, vocab_size); negative ids are errors too (they are never wrapped).

    Does nothing for traced tokens: see the module docstring for what the models do then.
    """
    if is_traced(tokens) or np.size(tokens) == 0:
        return
    # On the host: a concrete array met inside someone else's trace (e.g. `jnp.zeros` under
    # `jax.eval_shape`) would stage jnp reductions instead of computing them.
    host = np.asarray(tokens)
    low, high = int(host.min()), int(host.max())
    if low >= 0 and high < vocab_size:
        return
    bad = np.argwhere((host < 0) | (host >= vocab_size))
    where = tuple(int(i) for i in bad[0])
    at = f"(row {where[0]}, position {where[1]})" if len(where) == 2 else str(where)
    raise ValueError(
        f"{name}: token ids must lie in [0, {vocab_size}) (the config's vocab_size = "
        f"{vocab_size}), got ids in [{low}, {high}]; {len(bad)} out of range, the first "
        f"{int(host[where])} at {at}. Map the ids into the vocabulary (negative ids are not "
        "wrapped) or use a model config with a larger vocab_size."
    )


def in_vocabulary(tokens: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """Ids safe to gather with, and where the ids were valid.

    Args:
      tokens: (B, L) int.
      vocab_size: V.

    Returns:
      (ids (B, L), with out-of-range ids replaced by 0; valid (B, L) bool, 0 <= id < V).
      The caller zeroes the embeddings where `valid` is False and marks those logits.
    """
    valid = (tokens >= 0) & (tokens < vocab_size)
    return jnp.where(valid, tokens, jnp.zeros_like(tokens)), valid


def mark_invalid(logits: jax.Array, valid: jax.Array | None) -> jax.Array:
    """logits (B, L, V) with the positions where `valid` ((B, L) or broadcastable bool) is
    False set to NaN; unchanged (bit for bit) where it is True or when `valid` is None."""
    if valid is None:
        return logits
    return jnp.where(valid[..., None], logits, jnp.asarray(jnp.nan, logits.dtype))


# ---------------------------------------------------------------------------- attention mask
def check_attention_mask(
    mask: Any, tokens_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array | None]:
    """Validates a right-padding mask and returns it as booleans.

    Args:
      mask: (B, L) bool, or integer / float holding only 0 and 1 (1 = valid token); per row
        the valid tokens come first, then the padding (right padding only).
      tokens_shape: (B, L) of the tokens it masks.

    Returns:
      (mask (B, L) bool, row_ok): row_ok is None for a concrete mask (which raised if it was
      invalid), else (B, 1) bool, False for the rows of a traced mask that hold a value other
      than 0/1 or are not right padding (their logits are to be set to NaN).

    Raises:
      ValueError: wrong shape or dtype; for a concrete mask also values other than 0/1 and
        any row with a valid token after padding (left padding or holes).
    """
    if not hasattr(mask, "dtype"):
        mask = jnp.asarray(mask)
    if tuple(mask.shape) != tuple(tokens_shape):
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} != tokens shape {tuple(tokens_shape)}"
        )
    dtype = mask.dtype
    if not (
        jnp.issubdtype(dtype, jnp.bool_)
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise ValueError(
            f"attention_mask must be bool (or 0/1 integers or floats), got dtype {dtype}"
        )
    if is_traced(mask):
        binary = (mask == 0) | (mask == 1)
        valid = mask.astype(bool)
        after_padding = valid[:, 1:] & ~valid[:, :-1]
        row_ok = jnp.all(binary, axis=1) & ~jnp.any(after_padding, axis=1)
        return valid, row_ok[:, None]
    host = np.asarray(mask)
    binary = (host == 0) | (host == 1)
    if not binary.all():
        bad = tuple(int(i) for i in np.argwhere(~binary)[0])
        raise ValueError(
            "attention_mask must hold only 0/1 (or False/True; 1 = valid token), got "
            f"{host[bad]} at (row {bad[0]}, position {bad[1]})"
        )
    valid = host.astype(bool)
    after_padding = valid[:, 1:] & ~valid[:, :-1]
    if after_padding.any():
        row, pos = (int(i) for i in np.argwhere(after_padding)[0])
        raise ValueError(
            "attention_mask must be right padding: only right padding is supported (per row "
            f"the valid tokens first, then the padding), but row {row} has padding at "
            f"position {pos} followed by a valid token at position {pos + 1}. Left-align each "
            "row's tokens and pad at the end."
        )
    return jnp.asarray(valid), None


# ---------------------------------------------------------------------------- cache
def _kind(dtype: Any) -> str:
    for name, category in _KINDS:
        if jnp.issubdtype(dtype, category):
            return name
    return str(dtype)


def check_cache_leaves(cache: Any, expected: Any, formulas: Mapping[str, str], advice: str) -> None:
    """Compares a cache with the expected one leaf by leaf (shape and dtype kind).

    Args:
      cache: the cache given to the model.
      expected: the same pytree of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape` of the
        family's `init_cache` for this config and batch).
      formulas: the expected shape of each leaf in words, keyed by its path with layer
        indices written `[i]` (e.g. `.layers[i].cema`), to name the config fields involved.
      advice: what to do, appended to the message.

    Raises:
      ValueError: one message listing the first differing leaves (shape or dtype kind:
        bool, integer, floating, complex). Static, so it works under jit.
    """
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(cache)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(expected)
    if got_def != want_def:
        raise ValueError(
            f"cache has the wrong structure for this model: got {got_def}, expected "
            f"{want_def}. {advice}"
        )
    problems = []
    for (path, got), (_, want) in zip(got_leaves, want_leaves, strict=True):
        name = jax.tree_util.keystr(path)
        formula = formulas.get(re.sub(r"\[\d+\]", "[i]", name), "")
        formula = f" = {formula}" if formula else ""
        shape, dtype = tuple(jnp.shape(got)), jnp.result_type(got)
        if shape != tuple(want.shape):
            problems.append(f"cache{name} has shape {shape}, expected {want.shape}{formula}")
        elif _kind(dtype) != _kind(want.dtype):
            problems.append(
                f"cache{name} has dtype {dtype}, expected a {_kind(want.dtype)} dtype "
                f"({want.dtype})"
            )
    if problems:
        shown = "; ".join(problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"cache does not match this model and batch: {shown}{more}. {advice}")
