"""What W2 and W3 share: engines that stream weights from disk, each in its own worker process and memory
cgroup, with the page cache evicted and verified around every run (see w2.py for the method)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.bench import w1, w2_engines
from harness.bench.measure import Row
from harness.bench.pagecache import MemoryCgroup, cached_bytes, read_bytes
from harness.bench.workloads import Workload
from harness.planning.measure import evict
from harness.planning.worker import Worker

HEADROOM = 3 * 2**29
"""Memory a worker may add to what it holds after its warm-up: 1.5 GiB."""
SWEEP_TOKENS = 8
"""Output length of the policy sweep (projected to the full length to rank the policies)."""
_GiB = 2**30


@dataclass(frozen=True)
class OffloadRow(Row):
    """A timed run of an engine that reads weights from disk, measured from outside its worker process."""

    policy: str = ""
    peak_rss: int = 0
    """Peak resident bytes of the worker during the call (VmHWM, reset at the call)."""
    cached_before: int | None = None
    """Bytes of the model's and offload folders' files in the page cache when the call started."""
    disk_read: int | None = None
    """Bytes the worker read from the block device during the call (/proc/<pid>/io read_bytes)."""
    requested: int = 0
    """Bytes of disk-resident weights the engine asked for during the call."""
    io_wait_s: float | None = None
    """Ours: seconds blocked on disk reads of weights."""
    fetch_s: float | None = None
    """Ours: seconds in `WeightStore.fetch` (the reads it waits for, copies and conversions of small tensors;
    on the CPU matrices are cast to fp32 inside `linear`, counted as compute)."""


def sweep_policies(w: Workload, fractions: tuple[float, ...], **fields):
    """The policies a side tries: weights fraction in RAM x overlap on/off x (batch x 1, batch/2 x 2
    micro-batches), plus `fields`."""
    from runtime import Policy
    from runtime.policy import Placement

    return [Policy(gpu_batch_size=w.batch // nb, num_gpu_batches=nb, overlap=overlap, device="cpu",
                   weights=Placement(fraction, 0.0), weight_format="checkpoint", **fields)
            for fraction in fractions for overlap in (True, False) for nb in (1, 2) if w.batch % nb == 0]


def label(policy) -> str:
    return (f"{policy.gpu_batch_size}x{policy.num_gpu_batches} overlap {'on' if policy.overlap else 'off'}, "
            f"weights {policy.weights.device:.4f} in RAM")


def projected_s(row: Row, batch: int, output_len: int) -> float:
    """Prefill + decode seconds of `row` with its decode steps scaled to `output_len` tokens."""
    steps = row.tokens // batch - 1  # decode steps of the run (the prefill yields the first token)
    return row.prefill_s + (row.decode_s / steps * (output_len - 1) if steps > 0 else 0.0)


class Side:
    """One engine in its own worker process and, where possible, its own memory cgroup."""

    def __init__(self, name: str, watched: list[Path], stack: ExitStack) -> None:
        self.name, self.watched = name, watched
        self.cgroup = MemoryCgroup.create(f"flexhelm-bench-{name}")
        if self.cgroup:
            stack.callback(self.cgroup.remove)
        # closed before its cgroup is removed (ExitStack unwinds last in, first out)
        self.worker = stack.enter_context(Worker(name, preload=w2_engines.__name__))
        if self.cgroup:
            self.cgroup.add(self.worker.pid)
        self._hits = 0

    def load(self, warm_up: int, fn, *args) -> dict[str, int]:
        """Build the engine in the worker, warm it up untimed (`warm_up` tokens), then bound the worker's
        memory. Warm up as long as the runs where the worker's memory keeps growing over a run: the
        limit is its memory after the warm-up + `HEADROOM`, and memory it cannot reclaim is not swapped."""
        if self.cgroup:
            self.cgroup.limit(None)
        info = self.worker.call(fn, *args)
        self.run("warm-up", -1, warm_up)
        evict(self.watched)
        if self.cgroup:
            self.cgroup.limit(self.cgroup.usage() + HEADROOM)
        return info

    def run(self, engine: str, rep: int, n: int, policy: str = "") -> tuple[OffloadRow, w1.Ids]:
        evict(self.watched)
        cached = cached_bytes(self.watched)
        before = read_bytes(self.worker.pid)
        row, ids, extra = self.worker.call(w2_engines.run, rep, n)
        after = read_bytes(self.worker.pid)
        disk_read = after - before if before is not None and after is not None else None
        out = OffloadRow(**{**asdict(row), "engine": engine}, policy=policy, cached_before=cached,
                         disk_read=disk_read, **extra)
        return out, ids

    def limit_note(self) -> str:
        if self.cgroup is None:
            return "no memory cgroup (not writable here): page cache unbounded during runs"
        return (f"memory cgroup limit = warm-up memory + {HEADROOM / _GiB:.1f} GiB, reached "
                f"{self.cgroup.limit_hits()} times")


def print_sweep(w: Workload, sweep: list, best) -> None:
    for policy, row in sweep:
        tput = w.batch * w.output_len / projected_s(row, w.batch, w.output_len)
        print(f"{w.name} sweep {label(policy)}: {tput:.2f} tok/s projected to {w.output_len} tokens; {breakdown(row)}")
    print(f"{w.name} best policy: {label(best)} (the headline runs it)")


def breakdown(row: OffloadRow) -> str:
    text = f"prefill {row.prefill_s:.2f} s + decode {row.decode_s:.2f} s"
    if row.fetch_s is not None:
        text += (f"; blocked on disk {row.io_wait_s:.2f} s, rest of fetch {row.fetch_s - row.io_wait_s:.2f} s, "
                 f"compute (casts included) and the rest {row.busy_s - row.fetch_s:.2f} s")
    return text + f"; peak RSS {row.peak_rss / _GiB:.2f} GiB"


def print_page_cache(name: str, rows: list[OffloadRow], limits: dict[str, str]) -> None:
    cached = [r.cached_before for r in rows if r.cached_before is not None]
    print(f"{name} page cache before each run: " + (
        f"at most {max(cached) / 2**20:.1f} MiB of the model and offload files cached (fincore)" if cached
        else "unchecked (no fincore)"))
    for engine, note in limits.items():
        mine = [r for r in rows if r.engine.startswith(engine) and r.disk_read is not None and r.requested]
        reads = ", ".join(f"{r.disk_read / 1e9:.2f}/{r.requested / 1e9:.2f} GB" for r in mine)
        print(f"{name} {engine}: {note}; read from the device / disk weights asked for, per run: {reads or 'n/a'}")
