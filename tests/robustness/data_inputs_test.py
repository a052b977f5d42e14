"""A tfds build of enwik8 follows the file it was made from, and a bad file is named.

Oracles: the bytes each test zips itself (split 90/5/5 here, independently of the builder)
and the files it damages; no test reaches the network (the manual file is always given).
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from megalodon_flax.data import enwik8

NUM_BYTES = 30_000


def _raw(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, NUM_BYTES, dtype=np.uint8).tobytes()


def _zip(directory: Path, raw: bytes, member: str = "enwik8", stored: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "enwik8.zip"
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        zf.writestr(member, raw)
    return path


def _expected(raw: bytes) -> dict[str, np.ndarray]:
    a, b = len(raw) * 90 // 100, len(raw) * 95 // 100
    data = np.frombuffer(raw, np.uint8)
    return {"train": data[:a], "validation": data[a:b], "test": data[b:]}


def _load(tmp_path: Path, manual: str, fallback: bool = False) -> enwik8.Enwik8Data:
    return enwik8.load_enwik8_splits(tmp_path / "data", tmp_path / manual, fallback)


def _assert_splits(data: enwik8.Enwik8Data, raw: bytes) -> None:
    for split, expected in _expected(raw).items():
        np.testing.assert_array_equal(data[split], expected)


def _rebuilds(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    caplog.clear()
    return [m for m in messages if m.startswith("Rebuilding enwik8")]


def test_a_build_follows_the_content_of_its_source_file(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    a, b, c = _raw(1), _raw(2), _raw(3)
    zip_a = _zip(tmp_path / "A", a)
    _assert_splits(_load(tmp_path, "A"), a)
    assert _rebuilds(caplog) == []

    # The same content elsewhere: the build is reused (it still names where it came from).
    (tmp_path / "copy").mkdir()
    shutil.copy(zip_a, tmp_path / "copy" / "enwik8.zip")
    data = _load(tmp_path, "copy")
    assert data.source == f"manual file {zip_a}" and _rebuilds(caplog) == []
    _assert_splits(data, a)

    # Another file: rebuilt from it, with a warning naming both.
    zip_b = _zip(tmp_path / "B", b)
    data = _load(tmp_path, "B")
    _assert_splits(data, b)
    assert data.source == f"manual file {zip_b}"
    (warning,) = _rebuilds(caplog)
    assert f"built from {zip_a}" in warning and f"the configured file is {zip_b}" in warning

    # The same path with new content (a re-downloaded file): rebuilt again.
    _zip(tmp_path / "B", c)
    _assert_splits(_load(tmp_path, "B"), c)
    assert len(_rebuilds(caplog)) == 1

    # The file removed: the build stays; a manual directory without it names the build's file.
    (tmp_path / "B" / "enwik8.zip").unlink()
    _assert_splits(_load(tmp_path, "B"), c)
    _assert_splits(_load(tmp_path, "nowhere"), c)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"reusing the build made from {zip_b}" in m for m in messages)


def test_a_build_without_a_record_of_its_file_is_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    a = _raw(4)
    _zip(tmp_path / "A", a)
    data = _load(tmp_path, "A")
    metadata_file = Path(data.dataset_dir) / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    assert metadata["source_file"]["size"] == (tmp_path / "A" / "enwik8.zip").stat().st_size
    del metadata["source_file"]  # as an older version wrote it
    metadata_file.write_text(json.dumps(metadata))
    _assert_splits(_load(tmp_path, "A"), a)
    (warning,) = _rebuilds(caplog)
    assert "records no source file" in warning
    assert "source_file" in json.loads(metadata_file.read_text())


def test_new_split_ends_rebuild(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    raw = _raw(5)
    _zip(tmp_path / "A", raw)
    for ends in ((20_000, 25_000, 30_000), (10_000, 12_000, 29_000)):
        config = enwik8.Enwik8Config(name="custom_ends", split_ends=ends)
        builder = enwik8.prepare(config, tmp_path / "data", tmp_path / "A")
        test = enwik8.concat_chunks(builder.as_data_source(split="test"))
        np.testing.assert_array_equal(test, np.frombuffer(raw[ends[1] : ends[2]], np.uint8))
    assert "was split at [20000, 25000, 30000]" in _rebuilds(caplog)[0]


def _damage(directory: Path, case: str) -> Path:
    path = directory / "enwik8.zip"
    directory.mkdir(parents=True, exist_ok=True)
    if case == "not_a_zip":
        path.write_text("<mediawiki>this is the unzipped text, not the zip</mediawiki>")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        good = _zip(directory, _raw(6)).read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif case == "corrupt":  # a flipped byte inside the stored member: bad CRC
        good = bytearray(_zip(directory, _raw(7), stored=True).read_bytes())
        good[1000] ^= 0xFF
        path.write_bytes(bytes(good))
    elif case == "no_member":
        _zip(directory, _raw(8), member="enwik9")
    elif case == "too_short":
        _zip(directory, b"<page>")
    elif case == "directory":
        path.mkdir()
    return path


CASES = {
    "not_a_zip": "is not a zip archive",
    "empty": "is not a zip archive (0 bytes)",
    "truncated": "is truncated or corrupt (its zip directory is missing",
    "corrupt": "is truncated or corrupt (Bad CRC-32",
    "no_member": "has no member 'enwik8' (members: ['enwik9'])",
    "too_short": "is too short: its enwik8 member has 6 bytes",
    "directory": "cannot be read",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_file_is_named_in_one_message(tmp_path, case):
    path = _damage(tmp_path / "manual", case)
    # Even with the fallback allowed: the file given is wrong, the sample would hide it.
    with pytest.raises(enwik8.Enwik8FileError) as info:
        _load(tmp_path, "manual", fallback=True)
    message = str(info.value)
    assert message.startswith(f"{path} ") and CASES[case] in message, message
    assert "\n" not in message and enwik8.URL in message
    assert not (tmp_path / "data" / "enwik8" / "full" / "1.0.0").exists()
    assert not (tmp_path / "data" / "enwik8" / "sample").exists()


def test_a_failed_rebuild_keeps_the_old_build(tmp_path):
    a = _raw(9)
    _zip(tmp_path / "A", a)
    _assert_splits(_load(tmp_path, "A"), a)
    _damage(tmp_path / "bad", "truncated")
    with pytest.raises(enwik8.Enwik8FileError):
        _load(tmp_path, "bad")
    _assert_splits(_load(tmp_path, "nowhere"), a)
    assert sorted(p.name for p in (tmp_path / "data" / "enwik8" / "full").iterdir()) == ["1.0.0"]
