"""One timed generate of a model in a fresh worker process, past the page cache: what `flexhelm profile --fit`
fits the cost model to (the benchmarks that bound a whole process's RAM time their runs the same way).

A fresh process per run (`worker.Worker`) makes its peak RSS (VmHWM: interpreter, torch, model and the call) its
own, which is what a budget for "the whole process" bounds; it counts the load too. The model's and offload
folder's pages are evicted before the run and again before the timed call, so a policy that reads weights from disk
is timed reading the disk. `Engine.generate` runs on the whole prompt list (the engine cuts it into blocks).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness.planning.worker import Worker


@dataclass(frozen=True)
class Measured:
    """One timed greedy generate in its own process."""

    wall_s: float
    """Wall clock around the whole call."""
    prefill_s: float
    decode_s: float
    tokens: int
    """Generated tokens."""
    peak_rss: int
    """The worker's peak RSS in bytes, load included."""


def files_under(paths: Iterable[Path]) -> list[Path]:
    """The regular files among `paths` and below the folders among them."""
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(f for f in sorted(p.rglob("*")) if f.is_file())
        elif p.is_file():
            out.append(p)
    return out


def evict(paths: Iterable[Path]) -> None:
    """Drop the clean cached pages of every file in `paths` (folders: every file below them)."""
    for f in files_under(paths):
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile (scratch files)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_generate(path: Path, policy, prompts: list[list[int]], n: int, offload: Path, label: str = "ours",
                     full_warm_up: bool = False) -> Measured:
    """One greedy generate of exactly `n` tokens under `policy` in a fresh worker process named `label`, after an
    untimed warm-up in the same process: one micro-batch, 2 tokens, or (`full_warm_up`, for runs so short that
    first-use costs of kernel shapes would show) the very call that is then timed."""
    evict([path, offload])
    with Worker(label, preload=__name__) as worker:
        return worker.call(_generate, path, policy, prompts, n, str(offload), full_warm_up)


def _generate(state: dict, path: Path, policy, prompts: list[list[int]], n: int, offload: str,
              full_warm_up: bool) -> Measured:
    """`measure_generate`'s side in the worker."""
    from runtime import Engine
    from runtime.device import read_status

    engine = Engine(path, policy, offload_dir=offload)
    try:
        if full_warm_up:
            engine.generate(prompts, n, stop_at_eos=False)
        else:  # threads, first buffers
            engine.generate(prompts[:policy.gpu_batch_size], 2, stop_at_eos=False)
        load_peak = read_status("VmHWM") or 0  # generate resets the peak: keep the load's
        evict([path, Path(offload)])
        t0 = time.perf_counter()
        result = engine.generate(prompts, max_new_tokens=n, stop_at_eos=False)
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    s = result.stats
    return Measured(wall, s.prefill_s, s.decode_s, s.generated_tokens, max(load_peak, s.peak_memory["host"]))
