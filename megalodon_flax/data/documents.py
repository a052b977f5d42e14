"""Random-access document sources: a folder of text files, a JSONL dump, enwik8's pages.

A source is a sequence of documents (`len(source)`, `source[i]` → the document's bytes), the
shape Grain's `MapDataset.source` takes. Documents are bytes, not text: the byte tokenizer
takes them as they are (invalid UTF-8 included), a text tokenizer decodes them itself.

* `TextFiles`: a directory (searched recursively), a file or a glob, or several of these
  separated by commas. A `.jsonl` file holds one document per non-blank line, the string
  under `text_field` of a JSON object; any other file is one document. Empty files and
  blank lines hold no document and are skipped; every JSONL line is parsed once when the
  index is built, so a malformed line or a missing field fails there, naming file and line.
* `Enwik8Pages`: one split of enwik8 cut before every `<page>` element: document 0 is what
  precedes the first page (the dump's header, or the tail of a page cut by the split
  boundary), and every byte of the split is in exactly one document.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

JSONL_SUFFIX = ".jsonl"
# Index progress lines for large corpora.
PROGRESS_EVERY_FILES = 10_000
PROGRESS_EVERY_LINES = 1_000_000
PAGE_OPEN = b"<page>"


class CorpusError(ValueError):
    """A corpus that cannot be read as documents (no files, a bad JSONL line, ...)."""


def _expand(spec: str) -> list[str]:
    """Files named by a comma-separated list of directories, files and globs, sorted."""
    files: set[str] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if os.path.isdir(part):
            for root, _, names in os.walk(part):
                files.update(os.path.join(root, n) for n in names if not n.startswith("."))
        elif os.path.isfile(part):
            files.add(part)
        else:
            matches = [m for m in glob.glob(part, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise CorpusError(f"{part!r} is neither a directory, a file nor a matching glob")
            files.update(matches)
    return sorted(files)


class TextFiles:
    """Documents of text files and JSONL dumps (see the module docstring).

    Args:
      paths: comma-separated directories, files and globs.
      text_field: the JSONL key holding each document's text.

    Raises:
      CorpusError: no file, no document, a JSONL line that is not a JSON object, lacks
        `text_field` or holds a non-string there.
    """

    def __init__(self, paths: str, text_field: str = "text") -> None:
        self.paths = paths
        self.text_field = text_field
        self.files = _expand(paths)
        if not self.files:
            raise CorpusError(f"no files under {paths!r}")
        # One row per document: (file index, byte offset, byte length, line number or 0).
        index: list[tuple[int, int, int, int]] = []
        for f, path in enumerate(self.files):
            if path.endswith(JSONL_SUFFIX):
                index += [(f, off, n, line) for off, n, line in self._jsonl_lines(path)]
            else:
                size = os.path.getsize(path)
                if size:
                    index.append((f, 0, size, 0))
            if f % PROGRESS_EVERY_FILES == PROGRESS_EVERY_FILES - 1:
                logging.info(
                    "Indexed %d of %d files, %d documents", f + 1, len(self.files), len(index)
                )
        if not index:
            raise CorpusError(f"the {len(self.files)} files under {paths!r} hold no document")
        self._index = np.asarray(index, np.int64)

    def _jsonl_lines(self, path: str) -> list[tuple[int, int, int]]:
        lines = []
        offset = 0
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    self._parse(line, path, number)
                    lines.append((offset, len(line), number))
                offset += len(line)
                if number % PROGRESS_EVERY_LINES == 0:
                    logging.info("Indexing %s: %d lines", path, number)
        return lines

    def _parse(self, line: bytes, path: str, number: int) -> bytes:
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorpusError(f"{where}: not a JSON line ({exc})") from None
        if not isinstance(record, dict) or self.text_field not in record:
            raise CorpusError(f"{where}: no {self.text_field!r} field (set data.text_field)")
        text = record[self.text_field]
        if not isinstance(text, str):
            raise CorpusError(f"{where}: {self.text_field!r} holds {type(text).__name__}")
        # A lone surrogate ("\ud800" escapes) has no UTF-8 form: kept as the bytes Python
        # would write, which only the byte tokenizer takes as they are (`check_utf8`).
        return text.encode("utf-8", errors="surrogatepass")

    def __len__(self) -> int:
        return int(self._index.shape[0])

    def __getitem__(self, i: int) -> bytes:
        f, offset, size, line = (int(v) for v in self._index[i])
        path = self.files[f]
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = fh.read(size)
        return self._parse(raw, path, line) if line else raw

    def describe(self, i: int) -> str:
        """Where document i lives: `path` or `path:line`."""
        f, _, _, line = (int(v) for v in self._index[i])
        return f"{self.files[f]}:{line}" if line else self.files[f]

    def __repr__(self) -> str:
        return f"TextFiles({self.paths!r}: {len(self.files)} files, {len(self)} documents)"


class Enwik8Pages:
    """One enwik8 split (uint8 (N,)) as documents cut before every `<page>`."""

    def __init__(self, data: np.ndarray) -> None:
        raw = np.asarray(data, np.uint8).tobytes()
        starts = [0]
        pos = raw.find(PAGE_OPEN, 1)
        while pos != -1:
            starts.append(pos)
            pos = raw.find(PAGE_OPEN, pos + 1)
        self._raw = raw
        self._bounds = [*starts, len(raw)]

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, i: int) -> bytes:
        return self._raw[self._bounds[i] : self._bounds[i + 1]]

    def describe(self, i: int) -> str:
        return f"enwik8 document {i} (bytes {self._bounds[i]}-{self._bounds[i + 1]} of the split)"


def check_utf8(source: Sequence[bytes]) -> None:
    """Raises CorpusError naming the first document of `source` that is not valid UTF-8
    (`source.describe(i)` where the source has it)."""
    for i in range(len(source)):
        try:
            source[i].decode("utf-8")
        except UnicodeDecodeError as exc:
            where = source.describe(i) if hasattr(source, "describe") else f"document {i}"
            raise CorpusError(
                f"{where} is not valid UTF-8 at byte {exc.start}; set data.invalid_utf8="
                "'replace' to replace such bytes, or train on bytes (no data.tokenizer)"
            ) from None


def split_documents(source: Sequence[bytes], eval_fraction: float) -> tuple[range, range]:
    """Document indices for training and evaluation: the last `eval_fraction` of the
    documents (at least one) are held out; with fewer than two documents nothing can be."""
    if not 0.0 < eval_fraction < 1.0:
        raise CorpusError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(source)
    if n < 2:
        raise CorpusError(f"{n} document: need at least 2 to hold one out for evaluation")
    held = max(1, round(n * eval_fraction))
    return range(0, n - held), range(n - held, n)


class DocumentRange:
    """The documents `indices` (a range) of a source, as a source."""

    def __init__(self, source: Sequence[bytes], indices: range) -> None:
        self.source = source
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> bytes:
        return self.source[self.indices[i]]

    def describe(self, i: int) -> str:
        describe = getattr(self.source, "describe", None)
        return describe(self.indices[i]) if describe else f"document {self.indices[i]}"
