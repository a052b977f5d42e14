"""enwik8 as a TensorFlow Datasets builder, plus a TensorFlow-free loader of whole splits.

enwik8 is the first 10^8 bytes of the English Wikipedia XML dump of 2006-03-03, the file of the
Hutter Prize. The standard byte-level language-modelling splits are train [0, 90M), validation
[90M, 95M) and test [95M, 100M). Each split is stored as consecutive chunks of `CHUNK_SIZE`
bytes in ArrayRecord files, so that `tfds.data_source` reads it back without TensorFlow.

Defining `Enwik8` registers the dataset name `enwik8` with tfds (it is not in the tfds catalog).
Two configs exist: `full` (a manual `enwik8.zip` or the canonical download) and `sample` (the
bundled prefix `sample/enwik8.zip`, kept apart so that it can never pass for a full build).

A build records the file it was made from (path, size, SHA-256); `prepare` rebuilds it, with
a warning naming both files, when the configured file's content differs. A file that is not a
zip, is truncated or corrupt, or is too short stops the build with an `Enwik8FileError`.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from megalodon_flax.data import source_file
from megalodon_flax.data.source_file import Enwik8FileError

URL = "http://mattmahoney.net/dc/enwik8.zip"
HOMEPAGE = "http://mattmahoney.net/dc/textdata.html"
ZIP_NAME = "enwik8.zip"
MEMBER_NAME = "enwik8"
FULL_NUM_BYTES = 100_000_000
# Exclusive end offsets of train, validation and test; train starts at byte 0.
STANDARD_SPLIT_ENDS = (90_000_000, 95_000_000, 100_000_000)
SPLITS = ("train", "validation", "test")
CHUNK_SIZE = 4096
SAMPLE_ZIP = Path(__file__).resolve().parent / "sample" / ZIP_NAME
REACHABILITY_TIMEOUT_S = 3.0
# Fewest bytes a split may hold: one byte to read and one to predict.
MIN_SPLIT_BYTES = 2

_BANNER = "!" * 100


class Enwik8UnavailableError(FileNotFoundError):
    """Raised when enwik8.zip is neither in the manual directory nor downloadable."""


def host_reachable(host: str, port: int, timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Returns whether a TCP connection to `host:port` opens within `timeout` seconds.

    The probe runs in a daemon thread so that a stalled DNS lookup, which the socket timeout
    does not cover, cannot block the caller for longer than `timeout`.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="enwik8-reachability", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result) and result[0]


def compute_split_bounds(
    num_bytes: int, split_ends: Sequence[int] | None = None
) -> dict[str, tuple[int, int]]:
    """Returns the `[start, end)` byte range of each split of a file of `num_bytes` bytes.

    Args:
        num_bytes: Length of the unzipped `enwik8` member.
        split_ends: Exclusive end offsets of train, validation and test (train starts at 0 and
            each split starts where the previous one ends). `None` selects the standard
            90M/95M/100M ends, or, for a file shorter than 100,000,000 bytes, a 90/5/5 split by
            proportion (logged as a warning).

    Returns:
        `{'train': (0, a), 'validation': (a, b), 'test': (b, c)}`.

    Raises:
        ValueError: If the ends are not increasing, exceed the file, or leave a split empty.
    """
    if split_ends is None:
        if num_bytes >= FULL_NUM_BYTES:
            ends = STANDARD_SPLIT_ENDS
        else:
            ends = (num_bytes * 90 // 100, num_bytes * 95 // 100, num_bytes)
            logging.warning(
                "enwik8 member has %d bytes, fewer than the %d bytes of the full enwik8: "
                "splitting it 90/5/5 by proportion into train %d, validation %d and test %d "
                "bytes. Metrics on these splits are not comparable with published enwik8 results.",
                num_bytes,
                FULL_NUM_BYTES,
                ends[0],
                ends[1] - ends[0],
                ends[2] - ends[1],
            )
    else:
        ends = tuple(int(e) for e in split_ends)
        if len(ends) != 3:
            raise ValueError(f"split_ends must hold 3 offsets (train, validation, test): {ends}")
        if ends[2] > num_bytes:
            raise ValueError(f"split_ends {ends} exceed the {num_bytes}-byte enwik8 member.")
    starts = (0, ends[0], ends[1])
    bounds = dict(zip(SPLITS, zip(starts, ends, strict=True), strict=True))
    for name, (start, end) in bounds.items():
        if end <= start:
            raise ValueError(
                f"Split {name!r} would be empty or negative: [{start}, {end}) "
                f"(ends {ends}, {num_bytes} bytes)."
            )
    return bounds


def _replace_hint() -> str:
    return f"Replace it with {ZIP_NAME} from {URL} (do not unzip it)."


def read_member(zip_path: epath.PathLike) -> bytes:
    """Returns the unzipped `enwik8` member of `zip_path` (`Enwik8FileError` names a bad file)."""
    hint = _replace_hint()
    return source_file.member_of(
        source_file.read_zip_bytes(zip_path, hint), zip_path, MEMBER_NAME, hint
    )


def _missing_file_message(manual_dir: epath.Path, reason: str) -> str:
    return (
        f"enwik8 is not available: {ZIP_NAME} is not in the manual directory {manual_dir} and "
        f"{reason}. Put the file at {manual_dir / ZIP_NAME} (do not unzip it), or pass the "
        f"directory that holds it as manual_dir. Get it from {URL} (see {HOMEPAGE}); it "
        f"holds one member, {MEMBER_NAME}, of {FULL_NUM_BYTES:,} bytes."
    )


@dataclasses.dataclass(eq=False)
class Enwik8Config(tfds.core.BuilderConfig):
    """Configuration of the enwik8 builder.

    Attributes:
        split_ends: Exclusive end offsets of train, validation and test in the unzipped member
            (train starts at 0). `None`: standard ends for the full file, 90/5/5 by proportion
            for a shorter file.
        use_bundled_sample: Read the sample shipped with this package instead of looking in
            the manual directory or downloading.
    """

    split_ends: tuple[int, int, int] | None = None
    use_bundled_sample: bool = False


class Enwik8(tfds.core.GeneratorBasedBuilder):
    """enwik8 as consecutive byte chunks; examples keep file order (int keys, no shuffling)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Byte chunks with their offsets; standard 90M/5M/5M splits."
    }
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        Enwik8Config(
            name="full",
            description="enwik8.zip from the manual directory or from the Hutter Prize site.",
        ),
        Enwik8Config(
            name="sample",
            description="Bundled 4,154,064-byte prefix of enwik8, split 90/5/5 by proportion.",
            use_bundled_sample=True,
        ),
    ]
    DEFAULT_CONFIG_NAME = "full"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {URL} and put {ZIP_NAME}, not unzipped, into the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The first 10^8 bytes of the English Wikipedia dump of 2006-03-03 (Hutter "
                f"Prize), stored as chunks of {CHUNK_SIZE} bytes with their offset in the file."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "bytes": tfds.features.Tensor(
                        shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
                    ),
                    "offset": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            homepage=HOMEPAGE,
            # tfds ignores a `disable_shuffling` class attribute; only this field keeps order.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _locate_zip(self, dl_manager: tfds.download.DownloadManager) -> tuple[epath.Path, str]:
        """Returns the zip to read and a description of where it came from."""
        config = self.builder_config
        if config.use_bundled_sample:
            return epath.Path(SAMPLE_ZIP), f"bundled sample {SAMPLE_ZIP}"
        # `dl_manager.manual_dir` raises when the directory is missing or empty; the configured
        # path is still needed, to tell the user where the file belongs.
        manual_dir = epath.Path(
            getattr(dl_manager, "_manual_dir", None) or dl_manager.download_dir / "manual"
        )
        manual_zip = manual_dir / ZIP_NAME
        if manual_zip.exists():
            return manual_zip, f"manual file {manual_zip}"
        url = urllib.parse.urlsplit(URL)
        port = url.port or (443 if url.scheme == "https" else 80)
        if not host_reachable(url.hostname or "", port):
            raise Enwik8UnavailableError(
                _missing_file_message(manual_dir, f"{url.hostname}:{port} is not reachable")
            )
        logging.info("Downloading %s", URL)
        try:
            path = dl_manager.download(URL)
        except Exception as err:
            raise Enwik8UnavailableError(
                _missing_file_message(manual_dir, f"downloading {URL} failed ({err!r})")
            ) from err
        return epath.Path(path), f"download {URL}"

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        zip_path, source = self._locate_zip(dl_manager)
        zip_bytes = source_file.read_zip_bytes(zip_path, _replace_hint())
        raw = source_file.member_of(zip_bytes, zip_path, MEMBER_NAME, _replace_hint())
        split_ends = self.builder_config.split_ends
        try:
            bounds = compute_split_bounds(len(raw), split_ends)
            short = {n: e - s for n, (s, e) in bounds.items() if e - s < MIN_SPLIT_BYTES}
            if short:
                raise ValueError(f"splits {short} hold fewer than {MIN_SPLIT_BYTES} bytes")
        except ValueError as err:
            raise Enwik8FileError(
                f"{zip_path} is too short: its {MEMBER_NAME} member has {len(raw):,} bytes, too "
                f"few for train/validation/test ({str(err).rstrip('.')}). {_replace_hint()}"
            ) from None
        logging.info("enwik8 from %s: %d bytes, splits %s", source, len(raw), bounds)
        self.info.metadata.update(
            source=source,
            source_file=source_file.fingerprint(zip_path, zip_bytes),
            split_ends=None if split_ends is None else list(split_ends),
            num_bytes=len(raw),
            split_bounds={name: list(b) for name, b in bounds.items()},
        )
        return {
            name: self._generate_examples(raw, start, end) for name, (start, end) in bounds.items()
        }

    def _generate_examples(
        self, raw: bytes, start: int, end: int
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yields `(i, {'bytes': uint8 (<=CHUNK_SIZE,), 'offset': int})` in file order."""
        view = memoryview(raw)
        for i, pos in enumerate(range(start, end, CHUNK_SIZE)):
            chunk = np.frombuffer(view[pos : min(pos + CHUNK_SIZE, end)], dtype=np.uint8)
            yield i, {"bytes": chunk, "offset": pos}


def concat_chunks(source: Sequence[Mapping[str, Any]], block: int = 1024) -> np.ndarray:
    """Concatenates the chunks of one split, read from a tfds data source, in order.

    Args:
        source: A `tfds.data_source` (or any sequence) of `{'bytes', 'offset'}` examples.
        block: Number of records fetched per `__getitems__` call.

    Returns:
        uint8 array `(num_bytes,)` holding the split's bytes.

    Raises:
        ValueError: If the chunks are not contiguous (wrong order or missing records).
    """
    n = len(source)
    getitems = getattr(source, "__getitems__", None)
    chunks: list[np.ndarray] = []
    expected = None
    for lo in range(0, n, block):
        keys = list(range(lo, min(lo + block, n)))
        records = getitems(keys) if getitems else [source[k] for k in keys]
        for record in records:
            offset = int(record["offset"])
            if expected is not None and offset != expected:
                raise ValueError(f"enwik8 chunks are not contiguous: offset {offset}, {expected=}")
            chunk = np.asarray(record["bytes"], dtype=np.uint8)
            chunks.append(chunk)
            expected = offset + chunk.size
    if not chunks:
        return np.zeros((0,), np.uint8)
    return np.concatenate(chunks)


@dataclasses.dataclass(frozen=True)
class Enwik8Data:
    """The three splits of enwik8 and where they came from.

    Attributes:
        splits: `{'train', 'validation', 'test'}` -> contiguous uint8 array `(num_bytes,)`.
        source: Where the bytes came from, e.g. `manual file /path/enwik8.zip`, for logging.
        is_sample: True when the bundled sample stands in for the full file.
        dataset_dir: The tfds directory the splits were read from.
    """

    splits: Mapping[str, np.ndarray]
    source: str
    is_sample: bool
    dataset_dir: str

    def __getitem__(self, split: str) -> np.ndarray:
        return self.splits[split]


def prepare(
    config: str | Enwik8Config = "full",
    data_dir: epath.PathLike | None = None,
    manual_dir: epath.PathLike | None = None,
) -> Enwik8:
    """Builds enwik8 in ArrayRecord format if `data_dir` does not hold it yet.

    Args:
        config: `'full'`, `'sample'` or a custom `Enwik8Config`.
        data_dir: tfds data directory; `None` is the tfds default (`$TFDS_DATA_DIR` or
            `~/tensorflow_datasets`).
        manual_dir: Directory that may hold `enwik8.zip`; `None` is the tfds default
            `<data_dir>/downloads/manual`.

    Returns:
        The prepared builder. An existing build is reused when it was made from the same
        content as the file configured now, and rebuilt (with a warning naming both files)
        when not (`stale_build_reason`); a failed rebuild restores the old build.

    Raises:
        Enwik8UnavailableError: If the full file is neither in `manual_dir` nor downloadable.
        Enwik8FileError: If the file is not a zip, truncated, corrupt or too short.
    """
    tfds.disable_progress_bar()

    def make_builder() -> Enwik8:
        return tfds.builder(
            "enwik8",
            config=config,
            data_dir=None if data_dir is None else str(data_dir),
            file_format="array_record",
            try_gcs=False,
        )

    builder = make_builder()
    stale = stale_build_reason(builder, manual_dir) if builder.data_path.exists() else None
    old = builder.data_path.parent / f"{builder.data_path.name}.replaced"
    if stale:  # set the old build aside until the new one is complete
        logging.warning("Rebuilding enwik8 in %s: %s", builder.data_dir, stale)
        if old.exists():
            old.rmtree()
        builder.data_path.rename(old)
        builder = make_builder()
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                manual_dir=None if manual_dir is None else str(manual_dir), try_download_gcs=False
            ),
        )
    except BaseException:
        if stale and not builder.data_path.exists():
            old.rename(builder.data_path)
        raise
    if stale:
        old.rmtree()
    return builder


def stale_build_reason(builder: Enwik8, manual_dir: epath.PathLike | None) -> str | None:
    """Why the existing build of `builder` no longer fits the file configured now, or None
    (`source_file.stale_reason`: same SHA-256 and split ends, or no file to compare)."""
    configured = epath.Path(SAMPLE_ZIP)
    if not builder.builder_config.use_bundled_sample:
        default = epath.Path(builder.data_dir_root) / "downloads" / "manual"
        configured = epath.Path(manual_dir or default) / ZIP_NAME
    ends = builder.builder_config.split_ends
    return source_file.stale_reason(
        builder.info.metadata or {}, configured, None if ends is None else list(ends)
    )


def load_enwik8_splits(
    data_dir: epath.PathLike | None = None,
    manual_dir: epath.PathLike | None = None,
    allow_sample_fallback: bool = True,
) -> Enwik8Data:
    """Prepares enwik8 if needed and returns each split as one contiguous uint8 array.

    In a multi-process run process 0 prepares the dataset first; the others then read it.
    Uses `manual_dir/enwik8.zip` or else the canonical download. Offline and without the
    manual file it fails within seconds, or, when `allow_sample_fallback`, falls back (with a
    loud warning) to the bundled sample, built under its own config `sample`.

    Args:
        data_dir: tfds data directory for the build cache; `None` is the tfds default.
        manual_dir: Directory that may hold `enwik8.zip`; `None` is the tfds default.
        allow_sample_fallback: Use the bundled sample when the full file is unavailable.

    Returns:
        The splits, each a uint8 array `(num_bytes,)`, with the source that was used.

    Raises:
        Enwik8UnavailableError: If the full file is unavailable and fallback is not allowed.
        Enwik8FileError: If the file is not a zip, truncated, corrupt or too short (never
            replaced by the sample: the file given is wrong).
    """
    if jax.process_count() == 1:
        return _load_splits(data_dir, manual_dir, allow_sample_fallback)
    # Several processes: process 0 builds the dataset first, the others then read it.
    from jax.experimental import multihost_utils

    data = None
    if jax.process_index() == 0:
        data = _load_splits(data_dir, manual_dir, allow_sample_fallback)
    multihost_utils.sync_global_devices("enwik8 prepared")
    return data if data is not None else _load_splits(data_dir, manual_dir, allow_sample_fallback)


def _load_splits(
    data_dir: epath.PathLike | None, manual_dir: epath.PathLike | None, allow_sample_fallback: bool
) -> Enwik8Data:
    try:
        builder = prepare("full", data_dir, manual_dir)
    except Enwik8UnavailableError as err:
        if not allow_sample_fallback:
            raise
        logging.warning(
            "\n%s\nFULL ENWIK8 IS NOT AVAILABLE, FALLING BACK TO THE BUNDLED SAMPLE %s "
            "(%d bytes zipped).\nMetrics are NOT comparable with published enwik8 results.\n"
            "Reason: %s\n%s",
            _BANNER,
            SAMPLE_ZIP,
            SAMPLE_ZIP.stat().st_size,
            err,
            _BANNER,
        )
        builder = prepare("sample", data_dir)
    config_name = builder.builder_config.name
    splits = {
        split: concat_chunks(
            tfds.data_source(
                f"enwik8/{config_name}:{builder.version}",
                split=split,
                data_dir=builder.data_dir_root,
                download=False,
                try_gcs=False,
            )
        )
        for split in SPLITS
    }
    source = str(builder.info.metadata.get("source", "unknown"))
    logging.info(
        "enwik8 splits from %s (%s): %s",
        source,
        builder.data_dir,
        {k: v.size for k, v in splits.items()},
    )
    return Enwik8Data(
        splits=splits,
        source=source,
        is_sample=builder.builder_config.use_bundled_sample,
        dataset_dir=str(builder.data_dir),
    )
