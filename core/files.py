"""The one atomic file writer: every file that a database row or a reader points at.

Write to a unique temp file in the same folder, fsync it, rename it over the target, then
fsync the folder, so after a crash or power cut a reader finds the old file or the new one,
never half of one, and the rename itself is durable. Unique temp names let several
processes (uvicorn workers) write the same target without sharing an inode.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path


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


def save_torch(obj: object, path: Path) -> None:
    """``torch.save`` through ``write_atomic``."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
