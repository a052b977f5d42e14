"""Float64 NumPy oracles of the language-model losses."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float64."""
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position −log p(target) in float64; logits (..., V), targets (...) int."""
    logp = log_softmax(logits)
    return -np.take_along_axis(logp, np.asarray(targets)[..., None].astype(np.int64), -1)[..., 0]


def next_token_loss(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Mean cross-entropy of predicting token t+1 from the logits at position t."""
    return float(cross_entropy(np.asarray(logits)[:, :-1], np.asarray(tokens)[:, 1:]).mean())
