"""Keeping the page cache out of a disk benchmark (files' pages are evicted by `harness.planning.measure.evict`):
count what is still cached, count what a process really read from the device, and bound a process's page cache
with a memory cgroup.

Linux only (`posix_fadvise`, `/proc/<pid>/io`, cgroups); elsewhere the checks report None and a
benchmark says that its page-cache conditions are unverified.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from harness.planning.measure import files_under


def cached_bytes(paths: Iterable[Path]) -> int | None:
    """Bytes of the files in `paths` now in the page cache (util-linux `fincore`); None without fincore."""
    files = files_under(paths)
    if not files or shutil.which("fincore") is None:
        return None if files else 0
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split())


def read_bytes(pid: int) -> int | None:
    """Bytes that process `pid` (all its threads) caused to be read from a block device: page-cache hits
    do not count (`/proc/<pid>/io` read_bytes)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryCgroup:
    """A child memory cgroup whose limit bounds its processes' memory, page cache included.

    The kernel charges a file page to the cgroup of the process that read it, and reclaims the
    cgroup's own pages once it reaches the limit: a limit a little above the processes' own memory
    leaves room for only that much page cache, whatever the rest of the machine has free. Where
    cgroups are not writable (no root, no memory controller delegated), `create` returns None.
    """

    _V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "-1")
    _V2 = ("memory.max", "memory.current", "max")

    def __init__(self, path: Path, files: tuple[str, str, str]) -> None:
        self.path = path
        self._limit, self._usage, self._unlimited = files

    @classmethod
    def create(cls, name: str) -> MemoryCgroup | None:
        for root, files in ((Path("/sys/fs/cgroup/memory"), cls._V1), (Path("/sys/fs/cgroup"), cls._V2)):
            path = root / f"{name}-{os.getpid()}"
            try:
                path.mkdir()
            except OSError:
                continue
            if (path / files[0]).exists():  # v2: only where the memory controller reaches the child
                return cls(path, files)
            path.rmdir()
        return None

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def usage(self) -> int:
        return int((self.path / self._usage).read_text())

    def limit(self, nbytes: int | None) -> None:
        """Set the limit; None removes it."""
        (self.path / self._limit).write_text(self._unlimited if nbytes is None else str(nbytes))

    def limit_hits(self) -> int:
        """How often usage reached the limit (v1 `memory.failcnt`, v2 `max` events): reclaim happened."""
        failcnt = self.path / "memory.failcnt"
        if failcnt.exists():
            return int(failcnt.read_text())
        events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        return int(events.get("max", 0))

    def remove(self) -> None:
        """Remove the cgroup (its processes must have exited; their page cache moves to the parent)."""
        try:
            self.path.rmdir()
        except OSError as e:
            print(f"note: could not remove the cgroup {self.path} ({e.strerror}); remove it with rmdir")
