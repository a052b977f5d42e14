"""The byte codec: text ↔ token ids of the byte-level vocabulary (ids 0-255)."""

from __future__ import annotations

import numpy as np


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 token ids (P,)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens: np.ndarray) -> str:
    """Token ids (any shape, flattened) → text; ids outside 0-255 are clipped, invalid UTF-8
    is replaced."""
    ids = np.clip(np.asarray(tokens).reshape(-1), 0, 255).astype(np.uint8)
    return bytes(ids.tolist()).decode("utf-8", errors="replace")
