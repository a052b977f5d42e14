"""Tests of the event-file decoder (megalodon_flax.event_files).

Oracles: values written here with clu's writer (two processes, an hparams summary, cuts of the
last file at every record boundary and inside records) and TensorBoard's own reader.
"""

from __future__ import annotations

import shutil

from megalodon_flax import event_files
from megalodon_flax.run_summary import load_run
from tests import helpers
from tests.reference import tensorboard


def test_event_file_reader_returns_what_clu_wrote(tmp_path) -> None:
    """`event_files.read_scalars` / `read_texts` against values written here with clu's writer:
    two processes (the later file wins), an hparams summary, and cuts of the last file."""
    from clu import metric_writers

    pattern = "events.out.tfevents.*"
    workdir = tmp_path / "w"
    helpers.write_events(
        workdir, {1: {"a": 0.5, "b": -2.0}, 2: {"a": 0.25}}, {2: {"sample": "first"}}
    )
    (first,) = workdir.glob(pattern)
    # A second process resumes at step 2; the file size after each flushed step marks where
    # that step's records end.
    writer = metric_writers.create_default_writer(str(workdir), asynchronous=False)
    writer.write_hparams({"learning_rate": 0.5, "schedule": "cosine"})
    writer.flush()
    (second,) = set(workdir.glob(pattern)) - {first}
    later = [
        (2, {"a": 0.125}, "h\u00e9llo \u2713 ```"),
        (3, {"a": 1.5, "b": 3.0}, None),
        (4, {"b": 2.75}, "last"),
    ]
    ends = [second.stat().st_size]
    for step, scalars, text in later:
        writer.write_scalars(step, scalars)
        if text is not None:
            writer.write_texts(step, {"sample": text})
        writer.flush()
        ends.append(second.stat().st_size)
    writer.close()

    def expected(num_later: int, tag: str) -> dict:
        values = {1: {"a": 0.5, "b": -2.0}, 2: {"a": 0.25}}
        texts = {2: "first"}
        for step, scalars, text in later[:num_later]:
            values.setdefault(step, {}).update(scalars)
            if text is not None:
                texts[step] = text
        if tag == "sample":
            return texts
        return {step: v[tag] for step, v in values.items() if tag in v}

    assert event_files.event_files(workdir) == [first, second]
    assert event_files.read_scalars(workdir, "a") == expected(3, "a") == {1: 0.5, 2: 0.125, 3: 1.5}
    assert event_files.read_scalars(workdir, "b") == expected(3, "b")
    assert event_files.read_scalars(workdir, "a", files=[first]) == {1: 0.5, 2: 0.25}
    assert event_files.read_scalars(workdir, "no_such_tag") == {}
    assert event_files.read_texts(workdir) == expected(3, "sample")
    assert event_files.read_texts(workdir, "no_such_tag") == {}
    # TensorBoard's own reader agrees.
    assert tensorboard.scalars(workdir, "a") == expected(3, "a")
    assert tensorboard.texts(workdir) == expected(3, "sample")

    # The writers' names as the 10th and 11th writer of one process within one second give
    # them: `...<second>.<host>.<pid>.9.v2` was started before `....10.v2`.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    stem = "events.out.tfevents.1700000000.host.4242"
    shutil.copy(first, renamed / f"{stem}.9.v2")
    shutil.copy(second, renamed / f"{stem}.10.v2")
    names = [p.name for p in event_files.event_files(renamed)]
    assert names == [f"{stem}.9.v2", f"{stem}.10.v2"]
    assert event_files.read_scalars(renamed, "a") == expected(3, "a")
    assert event_files.read_texts(renamed) == expected(3, "sample")
    assert load_run(renamed).series("a") == expected(3, "a")
    assert load_run(renamed).texts["sample"] == expected(3, "sample")

    # A killed writer leaves the last file cut anywhere: whole steps survive, a cut record and
    # what follows it are dropped, nothing raises.
    data = second.read_bytes()
    assert ends[-1] == len(data)
    for num_later, end in enumerate(ends):
        last = num_later == len(later)
        cuts = [end] if last else [end, end + 5, end + 20, ends[num_later + 1] - 1]
        for cut in cuts:
            cut_dir = tmp_path / f"cut_{cut}"
            cut_dir.mkdir()
            shutil.copy(first, cut_dir / first.name)
            (cut_dir / second.name).write_bytes(data[:cut])
            for tag in ("a", "b"):
                got = event_files.read_scalars(cut_dir, tag)
                if cut == end:
                    assert got == expected(num_later, tag), (cut, tag)
                else:  # inside the next step: its record of `tag` is whole or dropped
                    assert got in (expected(num_later, tag), expected(num_later + 1, tag)), cut
            if cut == end:
                assert event_files.read_texts(cut_dir) == expected(num_later, "sample"), cut
    empty = tmp_path / "cut_all"
    empty.mkdir()
    (empty / second.name).write_bytes(data[:7])  # not even a record header
    assert event_files.read_scalars(empty, "a") == {} and event_files.read_texts(empty) == {}
