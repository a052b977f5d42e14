"""Tests of the enwik8 tfds builder and the split loader (megalodon_flax.data.enwik8).

Oracles: the raw bytes written into the zip files here (every split must be their exact byte
range), the bundled sample's SHA-256, a local HTTP server for the download path, and a fresh
interpreter for the TensorFlow-free import.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from megalodon_flax.data import enwik8
from tests import helpers

SAMPLE_SHA256 = "d8b3b95fb4993726ea7dcc93ae3c9e08a1a04cc540d05d7656fd267cc8ab5d6a"
SAMPLE_NUM_BYTES = 4_154_064


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _write_zip(directory: Path, raw: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "enwik8.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", raw)
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Makes the reachability check report offline and forbids any download."""
    probes: list[tuple[str, int]] = []

    def unreachable(host: str, port: int, timeout: float = 0.0) -> bool:
        probes.append((host, port))
        return False

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("The download manager must not be used offline.")

    monkeypatch.setattr(enwik8, "host_reachable", unreachable)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", no_download)
    return probes


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# ----------------------------------------------------------------------------- split bounds


def test_split_bounds_standard_for_full_file(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    bounds = enwik8.compute_split_bounds(100_000_000)
    assert bounds == {
        "train": (0, 90_000_000),
        "validation": (90_000_000, 95_000_000),
        "test": (95_000_000, 100_000_000),
    }
    assert _warnings(caplog) == ""


def test_split_bounds_proportional_for_short_file(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    bounds = enwik8.compute_split_bounds(SAMPLE_NUM_BYTES)
    assert bounds == {
        "train": (0, 3_738_657),
        "validation": (3_738_657, 3_946_360),
        "test": (3_946_360, SAMPLE_NUM_BYTES),
    }
    message = _warnings(caplog)
    assert "90/5/5" in message and str(SAMPLE_NUM_BYTES) in message
    assert "3738657" in message and "207703" in message and "207704" in message


@pytest.mark.parametrize(
    "ends", [(10, 20), (10, 10, 30), (20, 10, 30), (10, 20, 1_001), (0, 10, 20)]
)
def test_split_bounds_rejects_bad_ends(ends: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        enwik8.compute_split_bounds(1_000, ends)


# ----------------------------------------------------------------------------- builder


def test_builder_stores_exact_byte_ranges(tmp_path: Path) -> None:
    raw = _random_bytes(300_000)
    _write_zip(tmp_path / "manual", raw)
    # Ends that are not multiples of the chunk size exercise the short last chunk.
    ends = (200_000, 250_001, 299_990)
    config = enwik8.Enwik8Config(name="tiny", split_ends=ends)
    builder = enwik8.prepare(config, tmp_path / "data", tmp_path / "manual")

    assert builder.info.disable_shuffling
    assert builder.info.metadata["source"] == f"manual file {tmp_path / 'manual' / 'enwik8.zip'}"
    starts = (0, ends[0], ends[1])
    for split, start, end in zip(enwik8.SPLITS, starts, ends, strict=True):
        source = builder.as_data_source(split=split)
        assert len(source) == -(-(end - start) // enwik8.CHUNK_SIZE)
        offsets = [int(source[i]["offset"]) for i in range(len(source))]
        assert offsets == list(range(start, end, enwik8.CHUNK_SIZE))
        got = enwik8.concat_chunks(source)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.frombuffer(raw[start:end], np.uint8))


def test_builder_proportional_split_and_loader(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    raw = _random_bytes(250_007, seed=1)
    manual_zip = _write_zip(tmp_path / "manual", raw)
    data = enwik8.load_enwik8_splits(
        tmp_path / "data", tmp_path / "manual", allow_sample_fallback=False
    )
    assert not data.is_sample
    assert data.source == f"manual file {manual_zip}"
    assert data.dataset_dir.endswith(os.path.join("enwik8", "full", "1.0.0"))
    a, b = 250_007 * 90 // 100, 250_007 * 95 // 100
    for split, (start, end) in zip(enwik8.SPLITS, [(0, a), (a, b), (b, 250_007)], strict=True):
        np.testing.assert_array_equal(data[split], np.frombuffer(raw[start:end], np.uint8))
    message = _warnings(caplog)
    assert "250007" in message and str(a) in message and "90/5/5" in message

    # A second call reads the cached build (the zip is gone) and still reports its source.
    manual_zip.unlink()
    again = enwik8.load_enwik8_splits(tmp_path / "data", tmp_path / "manual", False)
    assert again.source == data.source
    np.testing.assert_array_equal(again["test"], data["test"])


def test_offline_error_is_fast_and_says_where(
    tmp_path: Path, offline: list[tuple[str, int]]
) -> None:
    manual_dir = tmp_path / "manual"
    start = time.monotonic()
    with pytest.raises(enwik8.Enwik8UnavailableError) as info:
        enwik8.load_enwik8_splits(tmp_path / "data", manual_dir, allow_sample_fallback=False)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert str(manual_dir / "enwik8.zip") in message
    assert enwik8.URL in message
    assert offline == [("mattmahoney.net", 80)]
    assert not (tmp_path / "data" / "enwik8" / "full" / "1.0.0").exists()


def test_host_reachable_on_local_sockets() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert enwik8.host_reachable("127.0.0.1", server.getsockname()[1], timeout=2.0)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    assert not enwik8.host_reachable("127.0.0.1", port, timeout=2.0)
    assert time.monotonic() - start < 3


def test_download_through_download_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _random_bytes(120_000, seed=2)
    _write_zip(tmp_path / "www", raw)
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www")
    )
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/enwik8.zip"
        monkeypatch.setattr(enwik8, "URL", url)
        data = enwik8.load_enwik8_splits(
            tmp_path / "data", tmp_path / "manual", allow_sample_fallback=False
        )
    finally:
        server.shutdown()
        server.server_close()
    assert data.source == f"download {url}"
    joined = np.concatenate([data[s] for s in enwik8.SPLITS])
    np.testing.assert_array_equal(joined, np.frombuffer(raw, np.uint8))


# ----------------------------------------------------------------------------- bundled sample


def test_bundled_sample_member() -> None:
    with zipfile.ZipFile(enwik8.SAMPLE_ZIP) as zf:
        assert zf.namelist() == ["enwik8"]
        member = zf.read("enwik8")
    assert len(member) == SAMPLE_NUM_BYTES
    assert hashlib.sha256(member).hexdigest() == SAMPLE_SHA256


def test_sample_fallback(
    tmp_path: Path, offline: list[tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    data = enwik8.load_enwik8_splits(tmp_path / "data", tmp_path / "manual")
    assert time.monotonic() - start < 10
    assert data.is_sample
    assert str(enwik8.SAMPLE_ZIP) in data.source
    assert "FALLING BACK" in _warnings(caplog) and str(enwik8.SAMPLE_ZIP) in _warnings(caplog)
    # The sample lives under its own config and never fills the full build's directory.
    assert data.dataset_dir.endswith(os.path.join("enwik8", "sample", "1.0.0"))
    assert not (tmp_path / "data" / "enwik8" / "full" / "1.0.0").exists()

    sizes = {split: data[split].size for split in enwik8.SPLITS}
    train_end, valid_end = SAMPLE_NUM_BYTES * 90 // 100, SAMPLE_NUM_BYTES * 95 // 100
    assert sizes == {
        "train": train_end,
        "validation": valid_end - train_end,
        "test": SAMPLE_NUM_BYTES - valid_end,
    }
    with zipfile.ZipFile(enwik8.SAMPLE_ZIP) as zf:
        member = np.frombuffer(zf.read("enwik8"), np.uint8)
    np.testing.assert_array_equal(np.concatenate([data[s] for s in enwik8.SPLITS]), member)


def test_loading_does_not_import_tensorflow(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from megalodon_flax.data import enwik8
        enwik8.host_reachable = lambda *args, **kwargs: False
        data = enwik8.load_enwik8_splits({str(tmp_path / "data")!r}, {str(tmp_path / "m")!r})
        assert data.is_sample and data["train"].size > 0
        assert "tensorflow" not in sys.modules, "TensorFlow was imported"
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join((str(helpers.REPO_ROOT), os.environ.get("PYTHONPATH", ""))),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_fallback_to_bundled_sample_when_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(enwik8, "host_reachable", lambda *a, **k: False)
    data_dir, manual_dir = str(tmp_path / "tfds"), str(tmp_path / "none")
    splits = enwik8.load_enwik8_splits(data_dir, manual_dir, allow_sample_fallback=True)
    assert splits.is_sample
    with zipfile.ZipFile(helpers.SAMPLE_ZIP) as zf:
        raw = np.frombuffer(zf.read("enwik8"), np.uint8)
    joined = np.concatenate([splits["train"], splits["validation"], splits["test"]])
    np.testing.assert_array_equal(joined, raw)
    with pytest.raises(enwik8.Enwik8UnavailableError, match=r"enwik8\.zip"):
        enwik8.load_enwik8_splits(data_dir, manual_dir, allow_sample_fallback=False)
