"""Tokenizers: documents (bytes) ↔ int32 token ids, and ids back to text.

* `ByteTokenizer` (the default, vocabulary 256): a document's raw bytes are its ids, so any
  file is accepted as it is, invalid UTF-8 included.
* `HuggingFaceTokenizer`: a `tokenizers` JSON file (`tokenizer.json`).
* `SentencePieceTokenizer`: a sentencepiece `.model` file.

The two text tokenizers decode each document as UTF-8 first. Invalid UTF-8 is replaced by
U+FFFD with `invalid_utf8='replace'` (the default) or refused with an error naming the
document with `invalid_utf8='error'`. No special tokens (BOS/EOS) are added: documents are
told apart by the segment ids of packed rows.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from megalodon_flax.data import codec

INVALID_UTF8 = ("replace", "error")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or a document it cannot take."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, document: bytes) -> np.ndarray:
        """int32 ids (P,) of one document."""
        ...

    def decode(self, ids: np.ndarray) -> str:
        """Text of ids (any shape, flattened)."""
        ...


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256

    def encode(self, document: bytes) -> np.ndarray:
        return np.frombuffer(document, np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return codec.decode(ids)


class _TextTokenizer:
    """Shared UTF-8 handling of the tokenizers that take text."""

    def __init__(self, path: str, invalid_utf8: str) -> None:
        if invalid_utf8 not in INVALID_UTF8:
            raise TokenizerError(
                f"invalid_utf8 must be one of {INVALID_UTF8}, got {invalid_utf8!r}"
            )
        self.name = path
        self.invalid_utf8 = invalid_utf8

    def _text(self, document: bytes) -> str:
        try:
            return document.decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            if self.invalid_utf8 == "replace":
                return document.decode("utf-8", errors="replace")
            head = document[: max(exc.start - 20, 0) + 40]
            raise TokenizerError(
                f"a document is not valid UTF-8 at byte {exc.start} (starts {head[:40]!r}); "
                "set data.invalid_utf8='replace' to replace such bytes"
            ) from None

    def _decode_valid(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode(self, ids: np.ndarray) -> str:
        """Text of ids; an id outside the vocabulary (a model wider than its tokenizer can
        sample one) becomes U+FFFD."""
        out, run = [], []
        for i in (int(i) for i in np.asarray(ids).reshape(-1)):
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            out += [self._decode_valid(run), "\ufffd"]
            run = []
        return "".join([*out, self._decode_valid(run)])


class HuggingFaceTokenizer(_TextTokenizer):
    def __init__(self, path: str, invalid_utf8: str = "replace") -> None:
        super().__init__(path, invalid_utf8)
        import tokenizers

        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:
            raise TokenizerError(f"{path} is not a Hugging Face tokenizers JSON: {exc}") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, document: bytes) -> np.ndarray:
        encoding = self._tokenizer.encode(self._text(document), add_special_tokens=False)
        return np.asarray(encoding.ids, np.int32)

    def _decode_valid(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


class SentencePieceTokenizer(_TextTokenizer):
    def __init__(self, path: str, invalid_utf8: str = "replace") -> None:
        super().__init__(path, invalid_utf8)
        import sentencepiece

        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as exc:
            raise TokenizerError(f"{path} is not a sentencepiece model: {exc}") from None
        self.vocab_size = self._processor.get_piece_size()

    def encode(self, document: bytes) -> np.ndarray:
        return np.asarray(self._processor.encode(self._text(document)), np.int32)

    def _decode_valid(self, ids: list[int]) -> str:
        return self._processor.decode(ids)


def load_tokenizer(path: str | None, invalid_utf8: str = "replace") -> Tokenizer:
    """The tokenizer of a config: None → bytes, `*.json` → Hugging Face tokenizers, any
    other file → sentencepiece."""
    if path is None:
        return ByteTokenizer()
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path!r} does not exist")
    if path.endswith(".json"):
        return HuggingFaceTokenizer(path, invalid_utf8)
    return SentencePieceTokenizer(path, invalid_utf8)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Refuses a tokenizer whose ids do not all have a row in the model's embedding."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"the tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary holds {model_vocab_size}: set config.model.vocab_size to at least "
            f"{tokenizer.vocab_size}"
        )
