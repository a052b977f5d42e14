"""The zip file a dataset build reads: read with errors that name it, and fingerprinted.

A build records `fingerprint(path)` (path, size, SHA-256) so that a later load can tell
whether the file the configuration points at now is the one the build was made from.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath


class Enwik8FileError(ValueError):
    """Raised when an enwik8.zip exists but cannot be used (the message names the file):
    not a zip archive, truncated or corrupt, no `enwik8` member, or too short to split."""


def fingerprint(path: epath.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """`{'path', 'size', 'sha256'}` of a file (`data`: its bytes, if already read)."""
    path = epath.Path(path)
    digest = hashlib.sha256()
    if data is not None:
        digest.update(data)
        size = len(data)
    else:
        size = 0
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
                size += len(block)
    return {"path": str(path), "size": size, "sha256": digest.hexdigest()}


def describe(record: Mapping[str, Any]) -> str:
    """`path (N bytes, sha256 abcdef012345…)` of a fingerprint."""
    return f"{record['path']} ({record['size']:,} bytes, sha256 {str(record['sha256'])[:12]}…)"


def read_zip_bytes(zip_path: epath.PathLike, hint: str) -> bytes:
    """The raw bytes of `zip_path`; an unreadable path (a folder, no permission) raises
    `Enwik8FileError` naming it, followed by `hint`."""
    try:
        return epath.Path(zip_path).read_bytes()
    except OSError as err:
        raise Enwik8FileError(f"{zip_path} cannot be read ({err}). {hint}") from None


def member_of(zip_bytes: bytes, zip_path: epath.PathLike, member: str, hint: str) -> bytes:
    """The unzipped `member` of a zip archive held in memory; `zip_path` names it in errors.

    Raises:
        Enwik8FileError: Not a zip archive, truncated or corrupt (bad CRC, cut-off data,
            unsupported compression), or without `member`; the message ends with `hint`.
    """
    size = f"{len(zip_bytes):,} bytes"
    try:
        with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
            names = zf.namelist()
            if member not in names:
                raise Enwik8FileError(
                    f"{zip_path} has no member {member!r} (members: {names[:5]}). {hint}"
                )
            return zf.read(member)
    except Enwik8FileError:
        raise
    except zipfile.BadZipFile as err:
        if "not a zip file" in str(err) and not zip_bytes.startswith(b"PK\x03\x04"):
            raise Enwik8FileError(f"{zip_path} is not a zip archive ({size}). {hint}") from None
        what = "its zip directory is missing" if "not a zip file" in str(err) else str(err)
        raise Enwik8FileError(
            f"{zip_path} is truncated or corrupt ({what}; {size}). {hint}"
        ) from None
    except (zlib.error, EOFError, NotImplementedError, ValueError) as err:
        raise Enwik8FileError(
            f"{zip_path} is truncated or corrupt ({type(err).__name__}: {err}; {size}). {hint}"
        ) from None


def stale_reason(
    metadata: Mapping[str, Any], configured: epath.Path, split_ends: list[int] | None
) -> str | None:
    """Why a build with `metadata` no longer fits the file `configured` now, or None if it does.

    The build fits when `configured` has the SHA-256 the build recorded under `source_file`
    (its path may differ) and the build was split at `split_ends`. When `configured` does not
    exist (removed after building, or the build came from a download) the build is reused; a
    warning names the recorded manual file if it lay in another directory.
    """
    recorded = metadata.get("source_file")
    if recorded is not None and metadata.get("split_ends") != split_ends:
        return f"it was split at {metadata.get('split_ends')}, the config asks for {split_ends}"
    if not configured.exists():
        moved = recorded is not None and epath.Path(recorded["path"]).parent != configured.parent
        if moved and str(metadata.get("source", "")).startswith("manual file"):
            logging.warning(
                "%s does not exist; reusing the build made from %s.", configured, describe(recorded)
            )
        return None
    if recorded is None:
        return f"the build records no source file (an older version made it); reading {configured}"
    current = fingerprint(configured)
    if current["sha256"] == recorded["sha256"] and current["size"] == recorded["size"]:
        return None
    return f"it was built from {describe(recorded)}, but the configured file is {describe(current)}"
