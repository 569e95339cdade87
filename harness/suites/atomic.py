"""Whole-or-nothing file writes: a reader (or a rerun after kill -9) sees the old file or the new one, never half.

Write to a temporary file in the same folder, fsync it, rename it over the target (atomic on POSIX), then
fsync the folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_with(path: str | os.PathLike, write: Callable[[str], None], size: int | None = None) -> Path:
    """Call `write(tmp_path)` to produce the file (about `size` bytes, if known), then move it into place
    atomically. A full disk is a `DiskFullError` naming the folder, the bytes needed and those free."""
    from runtime.errors import disk_full

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private (0600); results are ordinary files
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        full = disk_full(e, path.parent, size)
        if full is None:
            raise
        raise full from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_with(path, lambda tmp: Path(tmp).write_bytes(data), len(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, data) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object (what a run folder's
    optional files read as before they are written)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
