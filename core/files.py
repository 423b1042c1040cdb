"""The one atomic file writer: every file that a database row or a reader points at.

Write to a unique temp file in the same folder, fsync it, rename it over the target, then
fsync the folder, so after a crash or power cut a reader finds the old file or the new one,
never half of one, and the rename itself is durable. Unique temp names let several
processes (uvicorn workers) write the same target without sharing an inode.

Checked files (index snapshots, model files) carry their SHA-256 in a header of the same
file, so data and checksum land in one rename; ``read_checked`` refuses a torn, truncated
or altered file with :class:`CorruptFile`, and the reader falls back to an older one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import time
from pathlib import Path

MAGIC = b"SAIDSUM1"  # then the 32-byte SHA-256 of the payload, then the payload
STALE_TEMP_S = 3600.0  # a temp file this old belongs to a writer that died


class CorruptFile(RuntimeError):
    """A checked file that is missing, truncated, or whose bytes do not match its checksum."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably. A failed write (disk full) removes its temp
    file and raises; the old file stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_checked(path: Path, data: bytes) -> None:
    """``write_atomic`` of ``data`` behind a header holding its checksum."""
    write_atomic(path, MAGIC + hashlib.sha256(data).digest() + data)


def read_checked(path: Path) -> bytes:
    """The payload of a checked file; :class:`CorruptFile` unless it is whole."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise CorruptFile(f"{path}: missing") from exc
    return _payload(raw, path)


def _payload(raw: bytes, path: Path) -> bytes:
    """The checked payload of a file's bytes; :class:`CorruptFile` unless it is whole."""
    head = len(MAGIC) + 32
    if len(raw) < head or not raw.startswith(MAGIC):
        raise CorruptFile(f"{path}: no checksum header (torn or not a checked file)")
    if hashlib.sha256(raw[head:]).digest() != raw[len(MAGIC) : head]:
        raise CorruptFile(f"{path}: checksum mismatch")
    return raw[head:]


def remove_stale_temps(folder: Path) -> None:
    """Delete temp files that writers killed mid-write left behind (old enough that no
    live writer still owns them)."""
    for tmp in folder.glob(".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
        except FileNotFoundError:  # another process removed it first
            continue


def save_torch(obj: object, path: Path) -> None:
    """``torch.save`` through ``write_checked``."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_checked(path, buf.getvalue())


def load_torch(path: Path, map_location: object = "cpu"):
    """``torch.load`` (tensors and plain containers only, never code) of a checked file.
    Files from before checksums (no header) load as they are: torch's own zip CRCs still
    catch most damage there."""
    import torch

    raw = path.read_bytes()  # read once
    data = _payload(raw, path) if raw.startswith(MAGIC) else raw
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:  # not a model file
        raise CorruptFile(f"{path}: not a readable model file ({type(exc).__name__}: {exc})") from exc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_identity(version: str, path: Path) -> tuple:
    """What tells a version's file content apart without reading it: the version, the path,
    and the file's inode, size, mtime and ctime (ctime: a ``chmod`` that makes an
    unreadable file readable); a file that cannot be stat-ed is (version, path). Readers
    that found a file unloadable compare it, so they re-read only once it changed."""
    try:
        st = path.stat()
    except OSError:
        return version, str(path)
    return version, str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


OSERROR_RETRY_S = 30.0  # an unchanged file that failed with an OSError is tried again after this


class FailedLoad:
    """The last file a reader failed to load, and why: it is not read again until it changes
    (``file_identity``), so a loop that checks a few times a second does not re-read and
    checksum a large broken file each time, for as long as an operator takes. An
    ``OSError`` may pass by itself (too many open files, a network volume's hiccup), so it
    is tried again after ``OSERROR_RETRY_S`` even if the file is unchanged."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._error: Exception | None = None
        self._at = 0.0

    def known(self, version: str, path: Path) -> Exception | None:
        """The error of the last load of this very file, while it still stands."""
        if self._error is None or self._key != file_identity(version, path):
            return None
        if isinstance(self._error, OSError) and time.monotonic() - self._at > OSERROR_RETRY_S:
            return None
        return self._error

    def failed(self, version: str, path: Path, error: Exception) -> None:
        self._key, self._error, self._at = file_identity(version, path), error, time.monotonic()
