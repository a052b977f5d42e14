"""The Grain packing pipeline and the document sources.

Oracle: every document is a self-describing string `<i:letters>`, so the packed token
stream can be parsed back into documents by a regular expression, independently of Grain:
each epoch must hold every document exactly once and whole, and the segment ids and loss
weights must change exactly where the parse says a document starts.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.data import documents, packing, pipeline
from megalodon_flax.data.documents import CorpusError
from megalodon_flax.layers.segments import packed_target_weights

DOC = re.compile(rb"<(\d+):([a-z]*)>")


def _corpus(n: int, seed: int = 0, max_len: int = 40) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        f"<{i}:".encode() + bytes(rng.integers(97, 123, rng.integers(0, max_len)).tolist()) + b">"
        for i in range(n)
    ]


def _stream(batches: list[dict[str, np.ndarray]]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The rows' tokens (inputs + last target) one after another, with their segment ids
    and a row-start flag per token."""
    tokens, ids, row_start = [], [], []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            row = np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
            tokens.append(row)
            ids.append(np.concatenate([b["segment_ids"][r], [-1]]))
            flags = np.zeros(row.size, bool)
            flags[0] = True
            row_start.append(flags)
    return (
        np.concatenate(tokens).astype(np.uint8).tobytes(),
        np.concatenate(ids),
        np.concatenate(row_start),
    )


def _take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def _iterator(docs, **kwargs) -> packing.PackedTrainIterator:
    args = dict(seq_len=12, global_batch_size=3, seed=7) | kwargs
    return packing.PackedTrainIterator(docs, **args)


def test_each_epoch_holds_every_document_once_and_whole_in_a_new_order() -> None:
    docs = _corpus(25)
    it = _iterator(docs)
    total = sum(len(d) for d in docs)
    batches = _take(it, 3 * total // (3 * 13) + 2)
    it.close()
    text, _, _ = _stream(batches)
    matches = list(DOC.finditer(text))
    # The parse covers the stream without a gap (up to the cut at its end).
    assert matches[0].start() == 0
    for a, b in itertools.pairwise(matches):
        assert a.end() == b.start()
    order = [int(m.group(1)) for m in matches]
    for m in matches:
        assert m.group(0) == docs[int(m.group(1))]
    first, second = order[:25], order[25:50]
    assert sorted(first) == list(range(25)) and sorted(second) == list(range(25))
    assert first != second  # reshuffled every epoch
    assert first != list(range(25))


def test_segment_ids_and_weights_change_exactly_at_document_starts() -> None:
    docs = _corpus(30, seed=1)
    it = _iterator(docs, seq_len=16, global_batch_size=2)
    batches = _take(it, 12)
    it.close()
    text, ids, row_start = _stream(batches)
    starts = np.frombuffer(text, np.uint8) == ord("<")  # only documents start with '<'
    row_len = 17
    for r in range(len(text) // row_len):
        sl = slice(r * row_len, (r + 1) * row_len)
        seg, new_doc, first = ids[sl][:-1], starts[sl], row_start[sl]
        assert seg[0] == 1 and np.all(seg >= 1)
        # A run starts at the row start and wherever a document starts inside the row.
        run_start = np.concatenate([[True], seg[1:] != seg[:-1]])
        assert np.array_equal(run_start, (new_doc | first)[:-1])
    # Weight 0 exactly on the targets that start a document (the pair across two runs).
    weights = np.concatenate([b["weights"] for b in batches])
    for r in range(weights.shape[0]):
        targets_start = starts[r * row_len + 1 : (r + 1) * row_len]
        assert np.array_equal(weights[r] == 0, targets_start)


def test_batch_weights_drop_padding_and_pairs_across_documents() -> None:
    rng = np.random.default_rng(3)
    ids = np.sort(rng.integers(1, 5, (4, 33)), axis=1).astype(np.int32)
    ids[1, 20:] = 0  # padding at a row's end
    tokens = rng.integers(0, 256, (4, 33)).astype(np.int32)
    batch = packing.rows_to_batch(tokens, ids)
    want = np.zeros((4, 32), np.float32)
    for r in range(4):
        for t in range(32):  # input t predicts t + 1: both of one document
            want[r, t] = float(ids[r, t + 1] != 0 and ids[r, t + 1] == ids[r, t])
    np.testing.assert_array_equal(batch["weights"], want)
    np.testing.assert_array_equal(
        batch["weights"], np.asarray(packed_target_weights(jnp.asarray(ids)))
    )
    np.testing.assert_array_equal(batch["inputs"], tokens[:, :-1])
    np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
    np.testing.assert_array_equal(batch["segment_ids"], ids[:, :-1])


def test_state_resumes_the_same_batches_through_json() -> None:
    docs = _corpus(40, seed=2)
    straight = _iterator(docs)
    want = _take(straight, 9)
    straight.close()
    first = _iterator(docs)
    _take(first, 4)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = _iterator(docs, state=state)
    got = _take(resumed, 5)
    resumed.close()
    for a, b in zip(want[4:], got, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_prefetch_changes_nothing_and_seeds_change_the_order() -> None:
    docs = _corpus(20, seed=4)
    runs = {}
    for name, kwargs in {
        "p0": dict(prefetch=0),
        "p3": dict(prefetch=3),
        "s8": dict(seed=8),
    }.items():
        it = _iterator(docs, **kwargs)
        runs[name] = _stream(_take(it, 6))[0]
        it.close()
    assert runs["p0"] == runs["p3"]
    assert runs["p0"] != runs["s8"]


def test_processes_read_disjoint_documents_covering_the_corpus() -> None:
    docs = _corpus(21, seed=5)
    seen = []
    for index in range(3):
        it = _iterator(docs, global_batch_size=3, process_index=index, process_count=3)
        batches = _take(it, 40)
        it.close()
        assert {b["inputs"].shape for b in batches} == {(1, 12)}
        seen.append({int(m.group(1)) for m in DOC.finditer(_stream(batches)[0])})
    assert set.union(*seen) == set(range(21))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_resume_refuses_another_pipeline_or_corpus() -> None:
    docs = _corpus(10)
    with pytest.raises(ValueError, match="not a packed pipeline"):
        _iterator(docs, state={"step": 3})
    it = _iterator(docs)
    state = it.get_state()
    it.close()
    with pytest.raises(ValueError, match="corpus changed"):
        _iterator(docs[:9], state=state)
    data = np.arange(100, dtype=np.uint8)
    with pytest.raises(ValueError, match="not a byte-window"):
        pipeline.TrainIterator(data, seq_len=8, global_batch_size=2, seed=0, state=state)
    with pytest.raises(CorpusError, match="cannot be shared"):
        _iterator(docs[:2], global_batch_size=3, process_count=3)


# ---------------------------------------------------------------------------- sources
def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_text_files_reads_txt_jsonl_nested_and_raw_bytes(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "first document\n")
    _write(tmp_path / "empty.txt", "")
    _write(tmp_path / "sub" / "b.bin", b"\xff\xfe raw \x00 bytes")
    lines = [{"text": "line one"}, {"text": "zwei \u00fc"}, {"other": 1, "text": "three"}]
    body = "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n   \n" + json.dumps(lines[2]) + "\n"
    _write(tmp_path / "c.jsonl", body)
    corpus = documents.TextFiles(str(tmp_path))
    got = [corpus[i] for i in range(len(corpus))]
    assert got == [
        b"first document\n",
        b"line one",
        "zwei \u00fc".encode(),
        b"three",
        b"\xff\xfe raw \x00 bytes",
    ]
    assert "5 documents" in repr(corpus)
    only_json = documents.TextFiles(str(tmp_path / "*.jsonl") + "," + str(tmp_path / "a.txt"))
    assert len(only_json) == 4


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"text": "ok"}\n{"title": "no text"}\n', r"c\.jsonl:2: no 'text' field"),
        ('{"text": "ok"}\nnot json\n', r"c\.jsonl:2: not a JSON line"),
        ('{"text": 3}\n', r"c\.jsonl:1: 'text' holds int"),
        ('["text"]\n', r"c\.jsonl:1: no 'text' field"),
    ],
)
def test_text_files_names_the_bad_jsonl_line(tmp_path: Path, content: str, match: str) -> None:
    _write(tmp_path / "c.jsonl", content)
    with pytest.raises(CorpusError, match=match):
        documents.TextFiles(str(tmp_path))


def test_text_files_refuses_empty_and_missing_corpora(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="neither a directory"):
        documents.TextFiles(str(tmp_path / "nothing*.txt"))
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match="no files"):
        documents.TextFiles(str(tmp_path / "d"))
    _write(tmp_path / "d" / "e.txt", "")
    _write(tmp_path / "d" / "f.jsonl", "\n\n")
    with pytest.raises(CorpusError, match="hold no document"):
        documents.TextFiles(str(tmp_path / "d"))


def test_split_documents_holds_out_the_last_fraction() -> None:
    train, held = documents.split_documents(_corpus(200), 0.05)
    assert (train, held) == (range(0, 190), range(190, 200))
    assert documents.split_documents(_corpus(3), 0.01)[1] == range(2, 3)
    with pytest.raises(CorpusError, match="at least 2"):
        documents.split_documents(_corpus(1), 0.5)


def test_enwik8_pages_cut_before_every_page_and_keep_every_byte() -> None:
    text = b"<mediawiki><siteinfo/>\n  <page>a</page>\n  <page>bb</page>\n</mediawiki>"
    pages = documents.Enwik8Pages(np.frombuffer(text, np.uint8))
    docs = [pages[i] for i in range(len(pages))]
    assert b"".join(docs) == text
    assert docs[0] == b"<mediawiki><siteinfo/>\n  "
    assert docs[1] == b"<page>a</page>\n  " and docs[2].startswith(b"<page>bb")
    assert len(documents.Enwik8Pages(np.frombuffer(b"<page>x", np.uint8))) == 1


def test_check_utf8_names_the_file_and_line_of_a_bad_document(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "fine\n")
    _write(tmp_path / "b.txt", b"bad \xc3\x28 byte")
    corpus = documents.TextFiles(str(tmp_path))
    with pytest.raises(CorpusError, match=r"b\.txt is not valid UTF-8 at byte 4"):
        documents.check_utf8(corpus)
    # JSON escapes cannot carry invalid UTF-8 into a document, but a lone surrogate can.
    _write(tmp_path / "c.jsonl", '{"text": "ok"}\n{"text": "x\\ud800y"}\n')
    only = documents.TextFiles(str(tmp_path / "c.jsonl"))
    assert only.describe(1).endswith("c.jsonl:2")
    assert only[1] == b"x\xed\xa0\x80y"  # the surrogate's bytes, for the byte tokenizer
    with pytest.raises(CorpusError, match=r"c\.jsonl:2 is not valid UTF-8 at byte 1"):
        documents.check_utf8(only)
    held = documents.DocumentRange(corpus, range(1, 2))
    assert held.describe(0) == corpus.describe(1)
    pages = documents.Enwik8Pages(np.frombuffer(b"<h>\xff<page>x", np.uint8))
    with pytest.raises(CorpusError, match=r"enwik8 document 0 \(bytes 0-4 of the split\)"):
        documents.check_utf8(pages)


def test_a_document_longer_than_a_row_continues_in_the_next_rows() -> None:
    """Stated behaviour: the pieces of a long document fill consecutive rows, each piece a
    new run (the model resets there) and the pair across the row boundary unscored."""
    long_doc = b"<0:" + b"x" * 50 + b">"
    it = _iterator([long_doc], seq_len=9, global_batch_size=1, prefetch=0)
    rows = _take(it, 6)
    it.close()
    text, _, _ = _stream(rows)
    assert text == (long_doc * 2)[:60]  # one document, so every epoch repeats it
    for b in rows[:5]:  # bytes 0-49: inside the first copy, one run per row, all scored
        assert (b["segment_ids"] == 1).all() and b["weights"].all()
    assert rows[5]["segment_ids"][0].tolist() == [1] * 4 + [2] * 5  # the second copy at 54
