"""Bits per byte of a model over a whole split: streaming (state carried) or fixed windows.

* `stream` mode reads the split as `num_streams` contiguous streams (1 = the whole split as
  one stream) and feeds them call after call with the model's streaming cache, so every byte
  is predicted with all preceding context of its stream at constant memory.
* `window` mode cuts the split into contiguous, non-overlapping windows of `seq_len + 1`
  bytes that each start from a fresh state, as training evaluation does.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from megalodon_flax import input_pipeline, models
from megalodon_flax.losses import LN2, weighted_loss_sum
from megalodon_flax.model import MegalodonLM, ModelCache, init_cache

ProgressFn = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Summed negative log-likelihood over `num_tokens` predicted bytes."""

    mode: str
    nll_sum: float
    num_tokens: int
    seconds: float

    @property
    def loss(self) -> float:
        """Mean loss in nats per byte."""
        return self.nll_sum / max(self.num_tokens, 1)

    @property
    def bits_per_byte(self) -> float:
        return self.loss / LN2

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "loss": self.loss,
            "bits_per_byte": self.bits_per_byte,
            "num_tokens": self.num_tokens,
            "seconds": self.seconds,
        }


def _params(params: Any) -> Any:
    params = nn.unbox(params)
    return params["params"] if isinstance(params, dict) and "params" in params else params


@functools.partial(jax.jit, static_argnums=0)
def _stream_call(
    model: MegalodonLM, params: Any, cache: ModelCache, inputs: jax.Array, targets: jax.Array
) -> tuple[jax.Array, ModelCache]:
    logits, cache = model.apply({"params": params}, inputs, cache=cache)
    nll, _, _ = weighted_loss_sum(logits, targets, jnp.ones(targets.shape, jnp.float32))
    return nll, cache


@functools.partial(jax.jit, static_argnums=0)
def _window_call(model: MegalodonLM, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits, _ = model.apply({"params": params}, batch["inputs"])
    nll, _, _ = weighted_loss_sum(logits, batch["targets"], batch["weights"])
    return nll


def stream_eval(
    model: MegalodonLM,
    params: Any,
    data: np.ndarray,
    *,
    call_length: int | None = None,
    num_streams: int = 1,
    max_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Bits per byte of `data` read as `num_streams` streams with the state carried along.

    Args:
      model: the language model (byte vocabulary).
      params: its parameters (boxed or not, with or without the 'params' level).
      data: (N,) uint8 split.
      call_length: tokens per call (default: 4 chunks); memory does not grow with N.
      num_streams: contiguous streams read in parallel as a batch (1 = one stream).
      max_bytes: use only the first `max_bytes` bytes.
      progress: called as progress(tokens_done, tokens_total) after every call.

    Returns:
      EvalResult over every byte of each stream after its first.
    """
    if not models.has_carried_state(model):
        raise TypeError(
            f"stream evaluation needs a model that carries its state ({type(model).__name__} "
            "has a bounded context); use window_eval"
        )
    params = _params(params)
    data = np.asarray(data, np.uint8)
    if max_bytes is not None:
        data = data[:max_bytes]
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    stream_len = data.shape[0] // num_streams
    if stream_len < 2:
        raise ValueError(f"{data.shape[0]} bytes are too few for {num_streams} stream(s)")
    call_length = call_length or 4 * model.config.chunk_size
    streams = data[: stream_len * num_streams].reshape(num_streams, stream_len).astype(np.int32)
    inputs, targets = streams[:, :-1], streams[:, 1:]
    total = inputs.shape[1]
    cache = init_cache(model.config, num_streams)
    nll = jnp.zeros((), jnp.float32)
    start = time.perf_counter()
    for lo in range(0, total, call_length):
        hi = min(lo + call_length, total)
        call_nll, cache = _stream_call(model, params, cache, inputs[:, lo:hi], targets[:, lo:hi])
        nll = nll + call_nll
        if progress is not None:
            progress(hi * num_streams, total * num_streams)
    nll_sum = float(nll)
    return EvalResult("stream", nll_sum, total * num_streams, time.perf_counter() - start)


def window_eval(
    model: MegalodonLM,
    params: Any,
    data: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    max_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Bits per byte over contiguous, non-overlapping windows of `seq_len + 1` bytes.

    Each window starts from a fresh state; padding of the last batch carries weight 0.
    """
    params = _params(params)
    data = np.asarray(data, np.uint8)
    if max_bytes is not None:
        data = data[:max_bytes]
    num_batches = input_pipeline.num_eval_batches(
        data.shape[0], seq_len=seq_len, global_batch_size=batch_size, max_batches=max_batches
    )
    nll = jnp.zeros((), jnp.float32)
    tokens = 0.0
    start = time.perf_counter()
    batches = input_pipeline.eval_batches(
        data, seq_len=seq_len, global_batch_size=batch_size, max_batches=max_batches
    )
    for i, batch in enumerate(batches):
        nll = nll + _window_call(model, params, batch)
        tokens += float(batch["weights"].sum())
        if progress is not None:
            progress(i + 1, num_batches)
    return EvalResult("window", float(nll), int(tokens), time.perf_counter() - start)
