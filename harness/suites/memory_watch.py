"""A run's peak memory, on disk while the run computes, so that a run the OOM killer ends tells the next attempt.

The kernel's OOM killer (or a cgroup's) sends SIGKILL: nothing in the process runs after it. So while a run
computes, `MemoryWatch` samples the process's resident memory (`VmRSS`; `VmHWM` is reset by every engine call,
see `runtime.device.PeakMemory`) and rewrites `<run>/memory.json` whenever the peak grows, with `state: running`;
an orderly end (finished, failed, interrupted) writes `state: ended`. A next attempt that finds `running` knows
the last one died without ending, having reached at least `peak_rss` bytes, and `replan_budget` gives the RAM
the planner may use for it (`harness/suites/runner.py`). The sample interval bounds what the record can miss: growth in
the last `INTERVAL_S` before the kill.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from harness.suites import atomic

FILE = "memory.json"
INTERVAL_S = 0.2
GROWTH = 1.02
"""The record is rewritten when the peak grows by 2%: a few writes per run, not one per sample."""
SHRINK = 0.8
"""An attempt that died at peak P is replanned for at most SHRINK * P of RAM: below what it reached, and again
below each time it dies, so repeated kills converge on a plan that fits."""


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemoryWatch:
    """Context manager: samples this process's RSS on a thread and keeps `<run_dir>/memory.json` up to date."""

    def __init__(self, run_dir: str | os.PathLike, attempt: int | None = None) -> None:
        self.path = Path(run_dir) / FILE
        self.attempt = attempt or (last_attempt(run_dir) or {}).get("attempt", 0) + 1
        """This attempt's number: one more than the last record's (the run's first: 1)."""
        self.peak = 0
        self._written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flexhelm-memory", daemon=True)

    def __enter__(self) -> MemoryWatch:
        try:
            self.sample()
            self._write("running")
            self._thread.start()
        except BaseException:  # SIGTERM's KeyboardInterrupt lands anywhere: `running` must not outlive us
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._stop.set()  # the sampler stops before the last write, so it cannot write `running` after it
            if self._thread.is_alive():  # not started when __enter__ was interrupted before `start`
                self._thread.join()
            self.sample()
        finally:  # an orderly end, even when a signal interrupts the join
            self._write("ended")

    def sample(self) -> None:
        rss = rss_bytes()
        if rss is not None and rss > self.peak:
            self.peak = rss

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.sample()
            if self.peak > self._written * GROWTH:
                self._write("running")

    def _write(self, state: str) -> None:
        self._written = self.peak
        try:
            atomic.write_json(self.path, {"state": state, "peak_rss": self.peak, "attempt": self.attempt,
                                          "pid": os.getpid(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except OSError:  # a full disk must not end the run for want of this record
            pass


def last_attempt(run_dir: str | os.PathLike) -> dict | None:
    """The record of the run's last attempt, or None (never started, or written by an older flexhelm)."""
    data = atomic.read_json(Path(run_dir) / FILE)
    return data if isinstance(data.get("peak_rss"), int) else None


def replan_budget(record: dict | None) -> int | None:
    """RAM (bytes) to plan the next attempt for, when the last one died without ending (`state: running`, e.g.
    killed by the OOM killer); None when it ended in order or there is no record."""
    if not record or record.get("state") != "running" or record["peak_rss"] <= 0:
        return None
    return int(SHRINK * record["peak_rss"])
