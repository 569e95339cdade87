"""Disk I/O for the offloading tier: background reads and writes of tensors at file offsets.

Reads run in a thread pool (`os.preadv` releases the GIL, so they overlap with compute) in chunks of
16 MiB into the destination tensor's own memory (a reused buffer: no page faults), then drop the
pages they read from the page cache (`posix_fadvise(DONTNEED)`), so RAM use stays inside the policy's
host budget and a benchmark measures the disk rather than RAM.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import FlexhelmError

_CHUNK = 16 * 2**20


class OffloadError(FlexhelmError):
    """The offload folder cannot be used (missing, read-only, full) or holds damaged files."""


@dataclass(frozen=True)
class Region:
    """`nbytes` bytes at `offset` of `path`."""

    path: Path
    offset: int
    nbytes: int


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class Pending:
    """A group of futures: `wait()` re-raises the first error."""

    def __init__(self, futures: list[Future]) -> None:
        self.futures = futures

    def wait(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []


class DiskIO:
    """Reads regions into tensors and writes tensors to regions, in background threads."""

    def __init__(self, threads: int = 4) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="flexhelm-io")
        self._fds: dict[tuple[Path, bool], int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0

    def _fd(self, path: Path, write: bool) -> int:
        with self._lock:
            key = (path, write)
            if key not in self._fds:
                self._fds[key] = os.open(path, (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY, 0o644)
            return self._fds[key]

    def read(self, regions: list[Region], out: torch.Tensor) -> Pending:
        """Fill `out` (contiguous, CPU) with the regions' bytes, one after the other."""
        buf = byte_view(out)
        if sum(r.nbytes for r in regions) != len(buf):
            raise OffloadError(f"read of {sum(r.nbytes for r in regions)} bytes into a {len(buf)}-byte buffer")
        futures, pos = [], 0
        for r in regions:
            fd = self._fd(r.path, write=False)
            for a in range(0, r.nbytes, _CHUNK):
                n = min(_CHUNK, r.nbytes - a)
                futures.append(self.pool.submit(self._pread, fd, buf[pos + a:pos + a + n], r.offset + a, r.path))
            pos += r.nbytes
        self.bytes_read += pos
        return Pending(futures)

    def write(self, region: Region, src: torch.Tensor) -> Pending:
        """Write `src` (contiguous, CPU, not modified until the write completes) at `region`."""
        buf = byte_view(src)
        fd = self._fd(region.path, write=True)
        self.bytes_written += len(buf)
        return Pending([self.pool.submit(self._pwrite, fd, buf, region.offset, region.path)])

    @staticmethod
    def _pread(fd: int, buf: memoryview, offset: int, path: Path) -> None:
        got = os.preadv(fd, [buf], offset)
        if got != len(buf):
            raise OffloadError(f"{path} is shorter than expected (read {got} of {len(buf)} bytes at {offset}); "
                               "the file is truncated: delete it and rerun to rebuild it")
        os.posix_fadvise(fd, offset, len(buf), os.POSIX_FADV_DONTNEED)

    @staticmethod
    def _pwrite(fd: int, buf: memoryview, offset: int, path: Path) -> None:
        try:
            done = 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], offset + done)
        except OSError as e:
            raise OffloadError(f"cannot write {path}: {e.strerror}; free space or choose another --offload-dir") \
                from None
        os.posix_fadvise(fd, offset, len(buf), os.POSIX_FADV_DONTNEED)  # drops what is already written back

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
