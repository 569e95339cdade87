"""DiskIO: reads past the page cache at any offset, and the fallbacks where O_DIRECT is refused."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from runtime.disk import ALIGN, HUGE_PAGE, MERGE_GAP, DiskIO, OffloadError, Region, aligned_empty, span_capacity

# Regions at awkward places: unaligned start, a span crossing blocks, one ending at the file's last byte.
SIZE = 5 * ALIGN + 123
REGIONS = [(1, 10), (ALIGN - 6, 2 * ALIGN + 17), (3 * ALIGN, ALIGN), (SIZE - 301, 301), (0, SIZE)]


@pytest.fixture
def data_file(tmp_path):
    data = os.urandom(SIZE)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def opened(monkeypatch):
    """Flags of every os.open, optionally refusing O_DIRECT as tmpfs does."""
    calls, real = [], os.open

    def fake(path, flags, *args):
        calls.append(flags)
        if flags & os.O_DIRECT and opened.refuse:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args)

    def opened(refuse: bool = False):
        opened.refuse = refuse
        monkeypatch.setattr(os, "open", fake)
        return calls

    return opened


def _read_spans(path, regions):
    io = DiskIO()
    try:
        rs = [Region(path, off, n) for off, n in regions]
        raw = aligned_empty(span_capacity(rs))
        pending, parts = io.read_spans(rs, raw)
        pending.wait()
        return [bytes(p.numpy()) for p in parts], io.bytes_read
    finally:
        io.close()


@pytest.mark.parametrize("refuse", [False, True])
def test_read_spans_returns_exact_bytes_at_any_offset(data_file, opened, refuse):
    path, data = data_file
    flags = opened(refuse)
    got, nread = _read_spans(path, REGIONS)
    assert got == [data[off:off + n] for off, n in REGIONS]
    assert any(f & os.O_DIRECT for f in flags)  # tried first
    assert any(not f & os.O_DIRECT for f in flags) == refuse  # buffered only where refused
    assert nread == -(-SIZE // ALIGN) * ALIGN  # they overlap or touch: one span of whole blocks, counted as read


def test_regions_close_together_are_one_read_and_far_apart_ones_are_not(tmp_path, monkeypatch):
    """A layer's tensors lie together in a safetensors file: one read for them all, gaps under MERGE_GAP
    included (a small read costs its latency); a gap of MERGE_GAP or more is skipped."""
    path = tmp_path / "sparse.bin"
    far = 8 * ALIGN + MERGE_GAP  # MERGE_GAP + 2 blocks past the end of the first span's last block
    data = os.urandom(far + 3 * ALIGN)
    path.write_bytes(data)
    regions = [(far + 5, 100), (7, 2 * ALIGN), (5 * ALIGN + 1, 10), (far + ALIGN, 2 * ALIGN)]  # not in file order
    reads, real = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: reads.append((offset, len(bufs[0]))) or
                        real(fd, bufs, offset))
    got, nread = _read_spans(path, regions)
    assert got == [data[off:off + n] for off, n in regions]  # in the order asked
    assert sorted(reads) == [(0, 6 * ALIGN), (far, 3 * ALIGN)]  # the 2-block gap read through, the far one not
    assert nread == span_capacity([Region(path, off, n) for off, n in regions]) == 9 * ALIGN


def test_read_falls_back_to_buffered_when_the_block_size_is_larger(data_file, monkeypatch):
    """O_DIRECT opened, but a read is refused (EINVAL): that read is done buffered."""
    path, data = data_file
    real = os.preadv
    direct_fds = set()
    real_open = os.open

    def fake_open(p, flags, *args):
        fd = real_open(p, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_preadv(fd, bufs, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "preadv", fake_preadv)
    got, _ = _read_spans(path, REGIONS)
    assert direct_fds and got == [data[off:off + n] for off, n in REGIONS]


def test_read_into_unaligned_tensor_and_truncation(data_file):
    path, data = data_file
    io = DiskIO()
    try:
        out = torch.empty(SIZE - 107, dtype=torch.uint8)
        io.read([Region(path, 3, 100), Region(path, 200, SIZE - 207)], out).wait()
        assert bytes(out.numpy()) == data[3:103] + data[200:SIZE - 7]
        rs = [Region(path, ALIGN - 6, SIZE)]  # runs past the end of the file
        with pytest.raises(OffloadError, match="truncated"):
            io.read_spans(rs, aligned_empty(span_capacity(rs)))[0].wait()
        with pytest.raises(ValueError, match="aligned_empty"):
            io.read_spans(rs, aligned_empty(span_capacity(rs))[1:])
    finally:
        io.close()


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (Linux smaps)."""
    mapping = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            mapping = lo <= address < hi
        elif mapping and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError("address not mapped")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
def test_staging_buffers_are_huge_pages_and_read_exactly(tmp_path):
    """Buffers O_DIRECT reads land in are asked to be huge pages: on 4 KiB pages from a fragmented heap the
    kernel split 96 MiB reads here into 677 KiB requests (0.5-1.0 GB/s), on huge pages into 4 MiB ones (2+ GB/s)."""
    data = os.urandom(HUGE_PAGE + 3 * ALIGN)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    regions = [Region(path, 5, HUGE_PAGE), Region(path, HUGE_PAGE + ALIGN, 100)]
    raw = aligned_empty(span_capacity(regions))
    assert raw.data_ptr() % HUGE_PAGE == 0
    if os.path.exists("/sys/kernel/mm/transparent_hugepage"):  # a kernel built with THP
        assert "hg" in _vm_flags(raw.data_ptr())
    small = aligned_empty(ALIGN)  # below a huge page: an ordinary aligned tensor
    assert small.data_ptr() % ALIGN == 0 and small.numel() == ALIGN
    io = DiskIO()
    try:
        pending, parts = io.read_spans(regions, raw)
        pending.wait()
        assert [bytes(p.numpy()) for p in parts] == [data[r.offset:r.offset + r.nbytes] for r in regions]
    finally:
        io.close()


def test_read_errors_name_the_file_and_offset_and_a_prepared_folder_is_rebuilt(tmp_path, monkeypatch):
    """EIO in the middle of a run: the error names the file and the offset, nothing is zero-filled, and prepared
    weights that failed a read are not trusted again: the next run builds them anew."""
    from runtime.offload import OffloadDir

    built = []

    def producer(value: int):
        return lambda: built.append(value) or torch.full((1024,), value, dtype=torch.uint8)

    items = {"a": (1024, producer(1)), "b": (1024, producer(2))}
    offload = OffloadDir(tmp_path / "offload")
    regions = offload.prepared({"model": "x"}, items)
    assert built == [1, 2]
    real = os.preadv

    def failing(fd, buffers, offset):
        if os.readlink(f"/proc/self/fd/{fd}") == str(regions["b"].path):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing)
    io = DiskIO()
    try:
        out = torch.zeros(1024, dtype=torch.uint8)
        io.read([regions["a"]], out).wait()
        assert int(out[0]) == 1
        with pytest.raises(OffloadError, match=rf"cannot read {regions['b'].path} at offset 0 \(1024 bytes\): "
                                               r"Input/output error; the prepared weights in .* are rebuilt"):
            io.read([regions["b"]], torch.zeros(1024, dtype=torch.uint8)).wait()
    finally:
        io.close()
    monkeypatch.undo()
    again = offload.prepared({"model": "x"}, items)
    assert built == [1, 2, 1, 2] and again.keys() == regions.keys()  # rebuilt, not trusted
