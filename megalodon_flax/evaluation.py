"""Bits per byte of a model over a whole split: streaming (state carried) or fixed windows.

* `stream` mode reads the split as `num_streams` contiguous streams (1 = the whole split as
  one stream) and feeds them call after call with the model's streaming cache, so every byte
  is predicted with all preceding context of its stream at constant memory. A split of
  documents (segment ids: held-out text_files) is read one stream per document instead, each
  from a fresh state, `num_streams` documents at a time
  (`context_curve.carried_document_losses`).
* `window` mode runs a compiled eval step (`TrainingSetup.eval_step`, sharded over the mesh)
  over contiguous, non-overlapping windows of `seq_len + 1` bytes that each start from a
  fresh state; the training loop and the `evaluate` command both use it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from megalodon_flax import context_curve, families
from megalodon_flax.training.metrics import LN2, EvalMetrics

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


def stream_eval(
    model: families.LanguageModel,
    params: Any,
    data: np.ndarray,
    *,
    segment_ids: np.ndarray | None = None,
    call_length: int | None = None,
    num_streams: int = 1,
    max_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Bits per byte of `data` read as streams with the state carried along.

    Args:
      model: the language model (byte vocabulary).
      params: its parameters (boxed or not, with or without the 'params' level).
      data: (N,) token ids: a uint8 split of bytes, or a tokenizer's ids.
      segment_ids: (N,) int, the document of each token, for a split of documents one
        after another: each document is then one stream from a fresh state, and no token
        is predicted from another document.
      call_length: tokens per call (default: 4 chunks); memory does not grow with N.
      num_streams: streams read in parallel as a batch: contiguous equal parts of the
        split (1 = one stream), or with `segment_ids` documents.
      max_bytes: use only the first `max_bytes` tokens (bytes without a tokenizer); of
        documents, those that start before it, the one it cuts read up to the cut.
      progress: called as progress(done, total) after every call (tokens read, or with
        `segment_ids` targets scored).

    Returns:
      EvalResult over every token of each stream after its first.
    """
    if not families.family_of_model(model).carries_state:
        raise TypeError(
            f"stream evaluation needs a model that carries its state ({type(model).__name__} "
            "has a bounded context); use window_eval"
        )
    data = np.asarray(data)[:max_bytes]
    common = dict(num_streams=num_streams, call_length=call_length, progress=progress)
    if segment_ids is None:
        losses = context_curve.carried_position_losses(model, _params(params), data, **common)
    else:
        losses = context_curve.carried_document_losses(
            model, _params(params), data, np.asarray(segment_ids)[:max_bytes], **common
        )
    return EvalResult("stream", float(losses.nll.sum()), int(losses.count.sum()), losses.seconds)


def window_eval(
    eval_step: Callable[[Any, Mapping[str, Any]], EvalMetrics],
    params: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    num_batches: int | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Bits per byte over window batches, each window from a fresh state.

    Args:
      eval_step: `(params, batch) -> EvalMetrics`, e.g. `TrainingSetup.eval_step`.
      params: the model parameters as `eval_step` takes them.
      batches: `inputs`, `targets` int32 (B, L) and `weights` float32 (B, L) (0 = padding),
        e.g. from `data.pipeline.eval_batches`.
      num_batches: the number of batches, for `progress`.
      progress: called as progress(batches_done, num_batches) after every batch.

    Returns:
      EvalResult over every target with a positive weight.

    Raises:
      ValueError: if `batches` is empty.
    """
    total = None
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        step_metrics = eval_step(params, batch)
        total = step_metrics if total is None else total.merge(step_metrics)
        if progress is not None:
            progress(i + 1, num_batches or i + 1)
    if total is None:
        raise ValueError("window evaluation got no batches")
    loss = jax.device_get(total.loss)
    return EvalResult(
        "window", float(loss.total), round(float(loss.count)), time.perf_counter() - start
    )
