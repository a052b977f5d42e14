"""Bits per byte against the position in a stream: does more context keep helping?

A split is cut into `num_streams` contiguous streams of equal length (the remainder is
dropped). Every byte after a stream's first is predicted once; its *position* is the number
of bytes of its stream before it minus one (the index of the byte that predicts it), and the
losses are pooled in buckets of position [0, 512), [512, 1K), [1K, 2K), ... doubling up to the
stream length. With several streams each bucket pools the same positions of every stream.

* `carried_position_losses`: a model that carries its state (Megalodon) reads each stream
  call after call with its cache, at constant memory. `protocol="exact"` carries the exact
  statistics; `protocol="upstream"` is the released code's evaluation (XuezheMax/megalodon,
  `inference.py` and `truncate_cache`): calls of two chunks, and once 8 chunks are read, the
  last 6 chunks rerun from a fresh state after each call and their TimestepNorm statistics
  (every layer's and the final norm's) replace the carried ones; the KV ring and the CEMA
  state stay. Its normalization therefore sees the last 6-8 chunks only.
* `carried_document_losses`: the same model reads each document of a split of documents
  (segment ids) as its own stream from a fresh state; positions count within the document.
* `windowed_position_losses`: a model of bounded context (the Llama baseline) reads each
  stream in windows of `window` bytes advanced by `stride`; the first window scores all its
  targets, every later one its last `stride`, so a target past the first window is predicted
  from between `window − stride` and `window − 1` bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from megalodon_flax import families
from megalodon_flax.training.metrics import LN2, token_cross_entropy

PROTOCOLS = ("exact", "upstream")
FIRST_BUCKET = 512
# The released code's protocol: chunks per call, and chunks read before statistics are
# recomputed over the last TRUNCATE_CHUNKS - CHUNKS_PER_CALL chunks.
CHUNKS_PER_CALL = 2
TRUNCATE_CHUNKS = 8

ProgressFn = Callable[[int, int], None]


def bucket_edges(length: int, first: int = FIRST_BUCKET) -> list[int]:
    """[0, first, 2·first, 4·first, ...] up to `length` (the last edge is `length`)."""
    edges = [0]
    edge = first
    while edge < length:
        edges.append(edge)
        edge *= 2
    return [*edges, length]


@dataclasses.dataclass
class PositionLosses:
    """Summed NLL (nats) and token counts per position bucket `[edges[i], edges[i+1])`."""

    edges: list[int]
    nll: np.ndarray
    count: np.ndarray
    seconds: float = 0.0
    method: str = ""

    @classmethod
    def empty(cls, length: int, method: str, edges: Sequence[int] | None = None) -> PositionLosses:
        """No losses yet over `length` positions, in `edges` (default `bucket_edges`)."""
        edges = bucket_edges(length) if edges is None else [int(e) for e in edges]
        rising = all(a < b for a, b in itertools.pairwise(edges))
        if edges[0] != 0 or edges[-1] != length or not rising:
            raise ValueError(f"bucket edges must rise from 0 to {length}, got {edges}")
        zeros = np.zeros(len(edges) - 1, np.float64)
        return cls(edges, zeros, zeros.copy(), method=method)

    def add(self, start: int, losses: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Adds per-token losses (streams, T) of positions start … start + T − 1, each
        counted with its weight (streams, T) (default 1; 0 = padding)."""
        stop = start + losses.shape[1]
        weights = np.ones(losses.shape) if weights is None else weights
        for i, (lo, hi) in enumerate(itertools.pairwise(self.edges)):
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                w = weights[:, a - start : b - start].astype(np.float64)
                self.nll[i] += (losses[:, a - start : b - start].astype(np.float64) * w).sum()
                self.count[i] += w.sum()

    @property
    def bits_per_byte(self) -> np.ndarray:
        """Per bucket (NaN where a bucket is empty)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.nll / self.count / LN2

    @property
    def total_bits_per_byte(self) -> float:
        return float(self.nll.sum() / max(self.count.sum(), 1) / LN2)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "buckets": [
                {"start": lo, "stop": hi, "tokens": int(n), "bits_per_byte": float(b)}
                for lo, hi, n, b in zip(
                    self.edges[:-1], self.edges[1:], self.count, self.bits_per_byte, strict=True
                )
            ],
            "bits_per_byte": self.total_bits_per_byte,
            "tokens": int(self.count.sum()),
            "seconds": self.seconds,
        }


def cut_streams(data: np.ndarray, num_streams: int) -> np.ndarray:
    """`data` (N,) token ids cut into `num_streams` contiguous equal streams: a
    (num_streams, N // num_streams) view (the remainder is dropped; calls cast their slice).
    Bytes stay uint8; the ids of a tokenizer keep their integer type."""
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.uint8)
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    length = data.shape[0] // num_streams
    if length < 2:
        raise ValueError(f"{data.shape[0]} bytes are too few for {num_streams} stream(s)")
    return data[: length * num_streams].reshape(num_streams, length)


@functools.partial(jax.jit, static_argnums=0)
def _carried_call(
    model: families.LanguageModel, params: Any, cache: Any, inputs: jax.Array, targets: jax.Array
) -> tuple[jax.Array, Any]:
    logits, cache = model.apply({"params": params}, inputs, cache=cache)
    return token_cross_entropy(logits, targets), cache


@functools.partial(jax.jit, static_argnums=0)
def _fresh_cache(model: families.LanguageModel, params: Any, inputs: jax.Array) -> Any:
    return model.apply({"params": params}, inputs, return_cache=True)[1]


def swap_norm_statistics(cache: Any, fresh: Any) -> Any:
    """`cache` with every TimestepNorm state (each layer's and the final one) from `fresh`;
    the KV rings, CEMA states and positions stay (the released code's `truncate_cache`)."""
    layers = cache.layers
    if isinstance(layers, tuple | list):
        layers = tuple(
            old.replace(norm=new.norm) for old, new in zip(layers, fresh.layers, strict=True)
        )
    else:  # scanned layers: one LayerCache stacked over the layers
        layers = layers.replace(norm=fresh.layers.norm)
    return cache.replace(layers=layers, final_norm=fresh.final_norm)


def _carried_calls(length: int, chunk: int, protocol: str, call_length: int) -> list[tuple]:
    """(start, stop, truncate) of each call over `length` inputs."""
    if protocol == "exact":
        return [(s, min(s + call_length, length), False) for s in range(0, length, call_length)]
    full = length // chunk * chunk
    calls = []
    for s in range(0, full, CHUNKS_PER_CALL * chunk):
        e = min(s + CHUNKS_PER_CALL * chunk, full)
        calls.append((s, e, TRUNCATE_CHUNKS * chunk <= e and (e < full or full < length)))
    if full < length:
        calls.append((full, length, False))
    return calls


def carried_position_losses(
    model: families.LanguageModel,
    params: Any,
    data: np.ndarray,
    *,
    num_streams: int = 1,
    protocol: str = "exact",
    call_length: int | None = None,
    progress: ProgressFn | None = None,
    edges: Sequence[int] | None = None,
) -> PositionLosses:
    """Position-bucketed losses of a state-carrying model reading `data` as streams.

    Args:
        model, params: the language model and its parameters (without the 'params' level).
        data: (N,) bytes of the split.
        num_streams: contiguous streams read in parallel as a batch.
        protocol: "exact" (carried statistics) or "upstream" (see the module docstring).
        call_length: tokens per call with "exact" (default 4 chunks); "upstream" uses 2.
        progress: called as progress(tokens_done, tokens_total) after every call.
        edges: bucket edges from 0 to the stream length − 1 (default `bucket_edges`).
    """
    family = families.family_of_model(model)
    if not family.carries_state:
        raise TypeError(
            f"{type(model).__name__} has a bounded context; use windowed_position_losses"
        )
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    chunk = model.config.chunk_size
    streams = cut_streams(data, num_streams)
    inputs, targets = streams[:, :-1], streams[:, 1:]
    length = inputs.shape[1]
    result = PositionLosses.empty(length, f"stream ({protocol} statistics)", edges)
    calls = _carried_calls(length, chunk, protocol, call_length or 4 * chunk)
    cache = family.init_cache(model.config, num_streams, 0)
    rerun = (TRUNCATE_CHUNKS - CHUNKS_PER_CALL) * chunk
    start = time.perf_counter()
    for lo, hi, truncate in calls:
        x, y = inputs[:, lo:hi].astype(np.int32), targets[:, lo:hi].astype(np.int32)
        losses, cache = _carried_call(model, params, cache, x, y)
        if truncate:
            fresh = _fresh_cache(model, params, inputs[:, hi - rerun : hi].astype(np.int32))
            cache = swap_norm_statistics(cache, fresh)
        result.add(lo, np.asarray(losses))
        if progress is not None:
            progress(hi * num_streams, length * num_streams)
    result.seconds = time.perf_counter() - start
    return result


def _document_bounds(segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop (D,) of each document: each run of equal ids in `segment_ids` (N,)."""
    change = np.flatnonzero(np.diff(segment_ids)) + 1
    return np.concatenate([[0], change]), np.concatenate([change, [segment_ids.size]])


def carried_document_losses(
    model: families.LanguageModel,
    params: Any,
    data: np.ndarray,
    segment_ids: np.ndarray,
    *,
    num_streams: int = 1,
    call_length: int | None = None,
    progress: ProgressFn | None = None,
    edges: Sequence[int] | None = None,
) -> PositionLosses:
    """Position-bucketed losses of a state-carrying model reading each document as a stream.

    Every document is read from a fresh (zero) state with its cache carried call after call
    (exact statistics); every token after its first is scored, predicted from all of its
    document before it and from nothing of another. A token's position is its index in its
    document minus one, so the buckets pool the same positions of every document.

    Documents of different lengths: they are sorted by length (longest first) and read
    `num_streams` at a time as one batch from a fresh cache, each padded after its end to the
    group's longest rounded up to a multiple of `call_length` (the rows of a last, smaller
    group are all padding). Padding has weight 0 and, the model being causal, never changes
    what a document's own tokens predict, so each document's losses are those of it read
    alone. Every call has the shape (num_streams, call_length): one compilation, and memory
    bounded whatever the document lengths. Sorting keeps the padding small; refilling a
    finished row with the next document instead would need a state reset per row, which the
    cache cannot express (its position is one scalar shared by the rows).

    Args:
        model, params: the language model and its parameters (without the 'params' level).
        data: (N,) token ids of the documents one after another.
        segment_ids: (N,) int, the document of each token (consecutive documents differ).
        num_streams: documents read in parallel as a batch.
        call_length: tokens per call (default 4 chunks).
        progress: called as progress(targets_done, targets_total) after every call.
        edges: bucket edges from 0 to the longest document's length − 1 (default
            `bucket_edges`).

    Raises:
        ValueError: mismatched shapes, `num_streams` < 1, or no document of two tokens.
    """
    family = families.family_of_model(model)
    if not family.carries_state:
        raise TypeError(f"{type(model).__name__} has a bounded context")
    data, segment_ids = np.asarray(data), np.asarray(segment_ids)
    if segment_ids.shape != data.shape or data.ndim != 1:
        raise ValueError(f"segment_ids {segment_ids.shape} must match the tokens {data.shape}")
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    call_length = call_length or 4 * model.config.chunk_size
    starts, stops = _document_bounds(segment_ids)
    sizes = stops - starts
    order = np.argsort(-sizes, kind="stable")
    order = order[sizes[order] >= 2]
    if order.size == 0:
        raise ValueError(f"none of the {sizes.size} documents holds two tokens to predict from")
    result = PositionLosses.empty(int(sizes[order[0]]) - 1, "documents, one stream each", edges)
    total, done = int((sizes[order] - 1).sum()), 0
    start = time.perf_counter()
    for first in range(0, order.size, num_streams):
        docs = order[first : first + num_streams]
        rows = np.zeros(num_streams, np.int64)  # tokens of each row's document (0: none)
        rows[: docs.size] = sizes[docs]
        cache = family.init_cache(model.config, num_streams, 0)
        for lo in range(0, int(rows[0]) - 1, call_length):
            tokens = np.zeros((num_streams, call_length + 1), np.int32)
            for row, doc in enumerate(docs):
                piece = data[starts[doc] + lo : min(starts[doc] + lo + call_length + 1, stops[doc])]
                tokens[row, : piece.size] = piece
            weights = lo + 1 + np.arange(call_length) < rows[:, None]  # the target exists
            losses, cache = _carried_call(model, params, cache, tokens[:, :-1], tokens[:, 1:])
            result.add(lo, np.asarray(losses), weights)
            done += int(weights.sum())
            if progress is not None:
                progress(done, total)
    result.seconds = time.perf_counter() - start
    return result


@functools.partial(jax.jit, static_argnums=0)
def _window_call(
    model: families.LanguageModel, params: Any, inputs: jax.Array, targets: jax.Array
) -> jax.Array:
    logits, _ = model.apply({"params": params}, inputs)
    return token_cross_entropy(logits, targets)


def windowed_position_losses(
    model: families.LanguageModel,
    params: Any,
    data: np.ndarray,
    *,
    window: int,
    stride: int | None = None,
    num_streams: int = 1,
    progress: ProgressFn | None = None,
    edges: Sequence[int] | None = None,
) -> PositionLosses:
    """Position-bucketed losses of any model reading `data` in sliding windows.

    Args:
        window: bytes per window (the model's training length for the Llama baseline).
        stride: bytes the window advances (default window // 2); every later window scores
            its last `stride` targets, predicted from `window − stride` … `window − 1` bytes.
        num_streams, progress, edges: as in `carried_position_losses`.
    """
    stride = stride or window // 2
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    streams = cut_streams(data, num_streams)
    inputs, targets = streams[:, :-1], streams[:, 1:]
    length = inputs.shape[1]
    result = PositionLosses.empty(length, f"sliding window {window}, stride {stride}", edges)
    start = time.perf_counter()
    for lo in range(0, max(length - window, 0) + stride, stride):
        hi = min(lo + window, length)
        pad = window - (hi - lo)  # only the last window: padding after the scored targets
        x = np.pad(inputs[:, lo:hi].astype(np.int32), ((0, 0), (0, pad)))
        y = np.pad(targets[:, lo:hi].astype(np.int32), ((0, 0), (0, pad)))
        losses = np.asarray(_window_call(model, params, x, y))[:, : hi - lo]
        first = 0 if lo == 0 else min(window - stride, hi - lo)
        result.add(lo + first, losses[:, first:])
        if progress is not None:
            progress(hi * num_streams, length * num_streams)
        if hi == length:
            break
    result.seconds = time.perf_counter() - start
    return result


def _bucket_label(lo: int, hi: int) -> str:
    def size(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"

    return f"{size(lo)}-{size(hi)}"


def markdown_table(curves: dict[str, PositionLosses]) -> str:
    """Bits per byte per position bucket, one column per curve (they share their buckets)."""
    names = list(curves)
    first = curves[names[0]]
    for name in names[1:]:
        if curves[name].edges != first.edges:
            raise ValueError(f"curve {name!r} has other buckets than {names[0]!r}")
    header = ["position in stream", "tokens", *[f"{n} bits/byte" for n in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (lo, hi) in enumerate(zip(first.edges[:-1], first.edges[1:], strict=True)):
        cells = [_bucket_label(lo, hi), f"{int(first.count[i]):,}"]
        cells += [f"{curves[n].bits_per_byte[i]:.4f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["all", f"{int(first.count.sum()):,}"]
    cells += [f"**{curves[n].total_bits_per_byte:.4f}**" for n in names]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(curves: dict[str, PositionLosses], path: str, title: str) -> None:
    """A PNG of bits per byte against position (log-scale x, each bucket at its midpoint)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        lo, hi = np.asarray(curve.edges[:-1]), np.asarray(curve.edges[1:])
        mid = np.where(lo > 0, np.sqrt(np.maximum(lo, 1) * hi), hi / 2)
        ax.plot(mid, curve.bits_per_byte, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in stream (bytes before the predicting byte)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
