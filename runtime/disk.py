"""Disk I/O for the offloading tier: background reads and writes of tensors at file offsets.

Reads run in a thread pool (`os.preadv` releases the GIL, so they overlap with compute) in chunks of
16 MiB into the destination tensor's own memory (a reused buffer: no page faults). They bypass the page
cache, so RAM use stays inside the policy's host budget and a benchmark measures the disk rather than RAM:
with O_DIRECT where the file offset, length and memory address are aligned (`read_spans` arranges that
for weights at any offset), else buffered and then dropped from the cache (`posix_fadvise(DONTNEED)`).
O_DIRECT matters on a small CPU: measured here (2 cores) during a GEMM, buffered reads took 0.4 of a core
for the kernel's copies and page-cache upkeep and halved the GEMM's rate (53 -> 27 GFLOP/s, disk
1.3-1.4 GB/s); O_DIRECT reads took 0.06 of a core (GEMM 47-48 GFLOP/s, disk 2.0 GB/s).
What else the disk's rate turned out to depend on: the number of reads (tensors that lie together are one
span, `MERGE_GAP`) and the physical memory they land in (`aligned_empty`: huge pages).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import FlexhelmError, disk_full

_CHUNK = 16 * 2**20
ALIGN = 4096
"""O_DIRECT needs the file offset, the length and the memory address aligned to the device's logical block
size (512 or 4096 bytes)."""
HUGE_PAGE = 2**21
MERGE_GAP = 2**20
"""Regions of one file less than this apart are read as one span, the gap included. A read's latency, not its
bytes, is what a small one costs: during W2's decode here a 4 KiB read (a bias, a norm) held a reader thread for
4-5.5 ms, as long as 8 MB of a large read, and a layer's 12 such reads took a quarter of the readers' time;
a 1 MiB gap costs under 1 ms at the disk's rate."""


class OffloadError(FlexhelmError):
    """The offload folder cannot be used (missing, read-only, full) or holds damaged files."""


def _damaged(path: Path) -> str:
    """What to do about a file that failed a read; a prepared weights folder (`runtime.offload`) loses its
    manifest, so the next run rebuilds it instead of trusting the file again."""
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        manifest.unlink(missing_ok=True)
        return f"the prepared weights in {path.parent} are rebuilt on the next run"
    return "the file or its disk is damaged: re-copy the checkpoint (or delete the file if flexhelm wrote it)"


@dataclass(frozen=True)
class Region:
    """`nbytes` bytes at `offset` of `path`."""

    path: Path
    offset: int
    nbytes: int


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """An uninitialized uint8 CPU tensor of `nbytes` whose first byte is `ALIGN`-aligned; on Linux, unpinned,
    backed by transparent huge pages where the kernel allows them (`_huge_empty`)."""
    if not pin and nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        return _huge_empty(nbytes)
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    start = -raw.data_ptr() % ALIGN
    return raw[start:start + nbytes]


def _huge_empty(nbytes: int) -> torch.Tensor:
    """`nbytes` of anonymous memory from a `HUGE_PAGE` boundary, asked to be huge pages before it is touched.

    Why: an O_DIRECT read is DMA'd into the buffer's physical pages, and a block request takes at most
    `max_segments` (254 on this machine's virtio disk) runs of physically contiguous memory. Into 4 KiB pages
    from a fragmented heap, the kernel split reads into requests of 677 KiB on average; into huge pages, into
    requests of `max_sectors_kb` (4 MiB), and the same 96 MiB reads ran 2-4x faster (docs/MEASUREMENTS.md,
    W2). With plain `torch.empty` buffers a run's disk rate depended on how fragmented
    memory was when its buffers were allocated. Where the kernel gives no huge pages (THP `never`) this is an
    ordinary buffer."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: no THP
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: an ordinary buffer
        pass
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]


def span_capacity(regions: list[Region]) -> int:
    """Bytes that `DiskIO.read_spans` needs for `regions`: their merged block-aligned spans."""
    return sum(end - start for _, start, end, _ in _spans(regions))


def _spans(regions: list[Region]) -> list[tuple[Path, int, int, list[int]]]:
    """(path, start, end, indices of the regions inside) of each span `read_spans` reads, in file order: the
    regions' enclosing `ALIGN`ed blocks, merged where they lie in one file less than `MERGE_GAP` apart."""
    spans: list[tuple[Path, int, int, list[int]]] = []
    for i in sorted(range(len(regions)), key=lambda i: (str(regions[i].path), regions[i].offset)):
        r = regions[i]
        start = r.offset - r.offset % ALIGN
        end = -(-(r.offset + r.nbytes) // ALIGN) * ALIGN  # past the end of the file at its last block
        if spans and spans[-1][0] == r.path and start <= spans[-1][2] + MERGE_GAP:
            path, first, last, inside = spans[-1]
            spans[-1] = (path, first, max(last, end), inside + [i])
        else:
            spans.append((r.path, start, end, [i]))
    return spans


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
        self._fds: dict[tuple[Path, str], int | None] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0

    def _fd(self, path: Path, mode: str) -> int | None:
        """A descriptor of `path` opened for `mode` ("read", "direct" or "write"); None for "direct" where the
        file system refuses O_DIRECT (tmpfs, some network file systems)."""
        with self._lock:
            key = (path, mode)
            if key not in self._fds:
                if mode == "direct":
                    try:
                        self._fds[key] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        self._fds[key] = None
                else:
                    self._fds[key] = os.open(path, (os.O_RDWR | os.O_CREAT) if mode == "write" else os.O_RDONLY,
                                             0o644)
            return self._fds[key]

    def read(self, regions: list[Region], out: torch.Tensor) -> Pending:
        """Fill `out` (contiguous, CPU) with the regions' bytes, one after the other."""
        buf = byte_view(out)
        if sum(r.nbytes for r in regions) != len(buf):
            raise OffloadError(f"read of {sum(r.nbytes for r in regions)} bytes into a {len(buf)}-byte buffer")
        futures, pos = [], 0
        for r in regions:
            futures += self._read_into(r.path, buf[pos:pos + r.nbytes], out.data_ptr() + pos, r.offset, r.nbytes)
            pos += r.nbytes
        return Pending(futures)

    def read_spans(self, regions: list[Region], raw: torch.Tensor) -> tuple[Pending, list[torch.Tensor]]:
        """Read the regions' enclosing `ALIGN`ed spans, merged where they are close (`MERGE_GAP`: one read
        for a layer's contiguous tensors), into `raw` (an `aligned_empty` of at least `span_capacity(regions)`
        bytes), so that every read can bypass the page cache with O_DIRECT; returns each region's bytes as a
        view of `raw` (in the order given), valid once the reads are waited for."""
        buf = byte_view(raw)
        spans = _spans(regions)
        if raw.data_ptr() % ALIGN or len(buf) < sum(end - start for _, start, end, _ in spans):
            raise ValueError("read_spans needs an aligned_empty buffer of span_capacity(regions) bytes")
        futures, parts, pos = [], [raw[:0]] * len(regions), 0
        for path, start, end, inside in spans:
            need = max(regions[i].offset + regions[i].nbytes for i in inside) - start
            futures += self._read_into(path, buf[pos:pos + end - start], raw.data_ptr() + pos, start, need)
            for i in inside:
                at = pos + regions[i].offset - start
                parts[i] = raw[at:at + regions[i].nbytes]
            pos += end - start
        return Pending(futures), parts

    def _read_into(self, path: Path, buf: memoryview, address: int, offset: int, need: int) -> list[Future]:
        """Chunked reads of `len(buf)` bytes at `offset` into `buf` (at `address`); the first `need` must exist."""
        aligned = not (offset % ALIGN or len(buf) % ALIGN or address % ALIGN)
        fd = self._fd(path, "direct") if aligned else None
        direct = fd is not None
        if not direct:
            fd = self._fd(path, "read")
        self.bytes_read += len(buf)
        return [self.pool.submit(self._pread, fd, buf[a:a + _CHUNK], offset + a, min(_CHUNK, need - a), path, direct)
                for a in range(0, len(buf), _CHUNK)]

    def write(self, region: Region, src: torch.Tensor) -> Pending:
        """Write `src` (contiguous, CPU, not modified until the write completes) at `region`."""
        buf = byte_view(src)
        fd = self._fd(region.path, "write")
        self.bytes_written += len(buf)
        return Pending([self.pool.submit(self._pwrite, fd, buf, region.offset, region.path)])

    @staticmethod
    def _pread(fd: int, buf: memoryview, offset: int, need: int, path: Path, direct: bool) -> None:
        try:
            got = os.preadv(fd, [buf], offset)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:  # O_DIRECT opened but refused (a logical block > ALIGN)
                fd = os.open(path, os.O_RDONLY)
                try:
                    return DiskIO._pread(fd, buf, offset, need, path, direct=False)
                finally:
                    os.close(fd)
            raise OffloadError(f"cannot read {path} at offset {offset} ({need} bytes): {e.strerror}; "
                               f"{_damaged(path)}") from None
        if got < need:
            raise OffloadError(f"{path} is truncated (read {got} of {need} bytes at offset {offset}); "
                               f"{_damaged(path)}")
        if not direct:  # buffered reads leave pages in the cache: drop them
            os.posix_fadvise(fd, offset, len(buf), os.POSIX_FADV_DONTNEED)

    @staticmethod
    def _pwrite(fd: int, buf: memoryview, offset: int, path: Path) -> None:
        try:
            done = 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], offset + done)
        except OSError as e:  # a full disk names the folder, the bytes this write needed and those free
            full = disk_full(e, path.parent, len(buf) - done)
            raise OffloadError(f"cannot write {path}: {full or e.strerror}; free space or choose another "
                               "--offload-dir") from None
        os.posix_fadvise(fd, offset, len(buf), os.POSIX_FADV_DONTNEED)  # drops what is already written back

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
