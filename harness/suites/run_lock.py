"""One writer per run folder: two `flexhelm run` of the same suite into the same results never compute one run.

A run holds an exclusive `flock` on `<run folder>/.lock` from the moment it starts until its `done.json` is
written or it fails. The kernel drops the lock when the holder's file is closed, including when its process
dies (kill -9, the OOM killer), so a lock never outlives its run and nothing has to be cleaned up by hand.
Another runner that meets a held run leaves it to its holder and goes on with the next one; its summary
names the runs it left, and running the command again after the holder ends finishes the suite.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK = ".lock"


class RunLock:
    """A held lock on a run folder; `release()` (or the process's end) frees it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def try_lock(run_dir: Path) -> RunLock | None:
    """The run folder's lock, or None when another process (or another runner of this one) holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # who holds it, for the other runner's message; written after locking, so it is always the holder's
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return RunLock(fd)


def holder(run_dir: Path) -> str:
    """Who holds the run folder's lock (`pid N on HOST`), as its holder wrote it."""
    try:
        return (run_dir / LOCK).read_text().strip() or "another process"
    except OSError:
        return "another process"
