"""W2: offloading, ours against HF accelerate's disk offload, both streaming most weights from disk.

Setup: a random-weight model stored fp16 in safetensors (models.py), at most `weight_ram_bytes` of
weights resident in RAM (0.5 GiB for opt-1.3b's 2.6 GB), the rest read from disk at every step; the same
random prompts, greedy, exactly `output_len` new tokens, fp32 compute on both sides (fp16 matmuls crawl
on this CPU).
- Ours: `Engine(Policy(weights=Placement(f, 0), weight_format="checkpoint"))`, so resident weights stay
  fp16 and disk weights are read in place from the safetensors file, converted one layer at a time. `f`
  is the largest fraction whose resident bytes fit the budget (`fit_fraction`): the runtime places whole
  tensors per layer by the middle of their bytes, so budget / total can overshoot (opt-1.3b: 0.204 keeps
  every layer's qkv, 0.56 GiB; what fits is 0.125, nothing resident). The policy is the fastest of
  overlap on/off x (batch x 1, batch/2 x 2 micro-batches), measured on a shortened output and projected
  to the full one; that policy alone runs against the baseline.
- Accelerate: `from_pretrained(dtype=float32, device_map=..., offload_folder=...)`. transformers 5 maps
  the offloaded weights of a safetensors checkpoint in place (nothing is written to the offload folder):
  each forward reads their fp16 bytes through `safe_open` (mmap) and casts them to fp32, the same bytes
  from disk as ours. `device_map="auto"` with `max_memory={"cpu": "0.5GiB"}` would put all of opt-1.3b
  on disk (accelerate reserves room for its largest layer, the 0.4 GB fp32 embedding, inside the
  budget), so `accelerate_device_map` fills the budget with resident fp32 modules in order instead:
  embedding (and its tied head), positions, final norm (0.40 GiB); every decoder layer on disk.
  The engines' worker-side code is in w2_engines.py.

Page cache: each engine runs in its own worker process (worker.py), in its own memory cgroup where the
machine allows one (pagecache.py). Before every run the pages of the model folder and the offload
folders are evicted (posix_fadvise DONTNEED) and `fincore` counts what is left. During a run ours drops
what it reads itself; accelerate's mmap reads leave pages behind, which its cgroup bounds: after an
untimed warm-up each worker's limit is set to its memory then + `_HEADROOM` (its transient buffers and a
page cache well below one step's weights, so no step finds the previous step's weights cached).
Verified per run: bytes the worker read from the device (/proc/<pid>/io read_bytes) against the bytes of
disk-resident weights it asked for (ours: its DiskIO counter; accelerate: offloaded weights x forwards).

Roofline (roofline.py): per step max(compute at the measured GEMM peak, RAM traffic, (checkpoint bytes -
budget) at the O_DIRECT disk bandwidth measured in the same run), summed over prefill and decode steps.
Ours' time is split inside its worker by wrapping `WeightStore.fetch` and `Pending.wait` (the runtime is
not changed): blocked on disk reads, converting weights to fp32 (the rest of fetch), compute (the rest).
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness.bench import models, report, roofline, w1, w2_engines
from harness.bench.measure import OtherLoad, Row, alternate, median_ratio, median_row
from harness.bench.pagecache import MemoryCgroup, cached_bytes, evict, read_bytes
from harness.bench.worker import Worker
from harness.bench.workloads import Workload

_HEADROOM = 3 * 2**29
"""Memory a worker may add to what it holds after its warm-up: 1.5 GiB."""
_SWEEP_TOKENS = 8
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
    """Ours: seconds in `WeightStore.fetch` (the reads it waits for plus conversion to fp32)."""


def run(w: Workload, out_dir: Path) -> str:
    arch = models.ARCHS[w.model]
    path = models.ensure_model(w.model)
    baseline = _accelerate_available(w)
    other = OtherLoad()
    budget = w.weight_ram_bytes
    print(f"{w.name}: {w.model} fp16, at most {budget / _GiB:.3g} GiB of weights in RAM, batch {w.batch}, "
          f"prompt {w.prompt_len}, output {w.output_len}, {w.repeats} A/B pairs, {torch.get_num_threads()} threads",
          flush=True)
    prompts = w1.random_prompts(w, arch.vocab)

    # The machine, measured before any engine runs: GEMM peaks, RAM and disk bandwidth
    files = sorted(path.glob("*.safetensors"))
    steps = roofline.generate_steps(w.batch, w.prompt_len, w.output_len)
    machine = roofline.measure(arch, steps, w.ram_probe_bytes, disk_file=max(files, key=lambda f: f.stat().st_size))
    disk_bytes = max(0, sum(f.stat().st_size for f in files) - budget)
    roof_prefill, roof_decode = roofline.roofline(arch, steps, machine, disk_bytes)
    fraction = fit_fraction(path, budget)

    with tempfile.TemporaryDirectory(prefix="flexhelm-w2-") as scratch, ExitStack() as stack:
        watched = [path, Path(scratch)]  # the model and both engines' offload folders
        ours = _Side("ours", watched, stack)
        acc = _Side("accelerate", watched, stack) if baseline else None
        if acc:  # loaded first: a baseline that cannot load fails before the long sweep
            # accelerate's heap grows over a whole run (~2.5 GiB more for opt-1.3b): warm up for a whole one
            acc_tiers = acc.load(w.output_len, w2_engines.load_accelerate, path, budget,
                                 Path(scratch) / "accelerate", prompts)

        # Sweep: ours under each policy on a shortened output, ranked by the time projected to the full one
        n = min(_SWEEP_TOKENS, w.output_len)
        sweep = []
        for policy in sweep_policies(w, fraction):
            ours.load(2, w2_engines.load_ours, path, policy, scratch, prompts, budget)
            sweep.append((policy, ours.run("ours-sweep", 0, n, label(policy))[0]))
        best = min(sweep, key=lambda ps: projected_s(ps[1], w.batch, w.output_len))[0]

        # Side by side: the best policy against accelerate, A B A B
        tiers = ours.load(2, w2_engines.load_ours, path, best, scratch, prompts, budget)
        pairs = alternate(lambda rep: ours.run("ours", rep, w.output_len, label(best)),
                          lambda rep: acc.run("accelerate", rep, w.output_len) if acc else None, w.repeats)
        if acc:
            w1.check_same_ids(w.name, pairs[0][0][1], pairs[0][1][1])
        limits = {s.name: s.limit_note() for s in (ours, acc) if s}
    cores = other.cores()  # after the workers are joined, so their CPU time is this run's own

    # Report
    ours_rows = [a[0] for a, _ in pairs]
    acc_rows = [b[0] for _, b in pairs if b is not None]
    roof = Row("roofline", 0, roof_prefill + roof_decode, roof_prefill, roof_decode, ours_rows[0].tokens)
    ratio = median_ratio(list(zip(ours_rows, acc_rows)), lambda r: r.throughput) if acc_rows else None
    fraction_of_roof = roof.busy_s / statistics.median(r.busy_s for r in ours_rows)
    peak = statistics.median(r.peak_rss for r in ours_rows) / _GiB
    print(f"{w.name} ours: weights fraction {fraction:.4f} -> GiB in RAM / on disk "
          f"{(tiers['device'] + tiers['host']) / _GiB:.3f} / {tiers['disk'] / _GiB:.3f}")
    if acc_rows:
        print(f"{w.name} accelerate: fp32 weights GiB in RAM {acc_tiers['cpu'] / _GiB:.3f}, fp16 GiB read from disk "
              f"per forward {acc_tiers['disk'] / _GiB:.3f}")
    _print_sweep(w, sweep, best)
    _print_record(w.name, ours_rows, acc_rows, roof, machine, disk_bytes)
    _print_page_cache(w.name, ours_rows + acc_rows + [r for _, r in sweep], limits)
    w1.print_other_load(w.name, cores)

    rows = [*(r for _, r in sweep), *ours_rows, *acc_rows, roof]
    print(f"{w.name} wrote {report.write_csv(rows, out_dir / f'{w.name}.csv')}")
    png = report.write_png([*ours_rows, *acc_rows, roof], out_dir / f"{w.name}.png",
                           f"{w.name}: {w.model}, {budget / _GiB:.3g} GiB weights in RAM, batch {w.batch}")
    if png:
        print(f"{w.name} wrote {png}")
    summary = (f"{w.name} ours/accelerate={'n/a' if ratio is None else f'{ratio:.2f}'} "
               f"roofline={fraction_of_roof:.2f} peak_rss_gb={peak:.2f}")
    print(summary, flush=True)
    return summary


def fit_fraction(path: Path, budget: int) -> float:
    """The largest weights fraction whose RAM-resident bytes stay within `budget`.

    The runtime puts a tensor in RAM when the middle of its bytes lies below the fraction of its layer's
    bytes (`runtime.weights.assign_tiers`; a tied weight is placed once, with its first layer), so the
    resident bytes are a step function of the fraction.
    """
    from runtime.checkpoint import Checkpoint
    from runtime.families import get_family

    ckpt = Checkpoint(path)
    seen, middles = set(), []  # (middle of the tensor's bytes as a fraction of its layer's, bytes)
    for layer in get_family(ckpt.spec.family).build_layers(ckpt.spec):
        specs = [s for s in layer.weight_specs() if s.sources not in seen]
        seen.update(s.sources for s in specs)
        sizes = [torch.Size(s.shape).numel() * ckpt.dtype_of(s.sources[0]).itemsize for s in specs]
        done = 0
        for size in sizes:
            middles.append(((done + size / 2) / max(1, sum(sizes)), size))
            done += size
    ckpt.close()
    fraction, resident = budget / sum(size for _, size in middles), 0
    for middle, size in sorted(middles):
        if middle >= fraction or resident + size > budget:
            return min(fraction, middle)  # every tensor whose middle lies below this one stays in RAM
        resident += size
    return fraction


def sweep_policies(w: Workload, fraction: float):
    from runtime import Policy
    from runtime.policy import Placement

    return [Policy(gpu_batch_size=w.batch // nb, num_gpu_batches=nb, overlap=overlap, device="cpu",
                   weights=Placement(fraction, 0.0), weight_format="checkpoint")
            for overlap in (True, False) for nb in (1, 2) if w.batch % nb == 0]


def label(policy) -> str:
    return f"{policy.gpu_batch_size}x{policy.num_gpu_batches} overlap {'on' if policy.overlap else 'off'}"


def projected_s(row: Row, batch: int, output_len: int) -> float:
    """Prefill + decode seconds of `row` with its decode steps scaled to `output_len` tokens."""
    steps = row.tokens // batch - 1  # decode steps of the run (the prefill yields the first token)
    return row.prefill_s + (row.decode_s / steps * (output_len - 1) if steps > 0 else 0.0)


class _Side:
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
        limit is its memory after the warm-up + `_HEADROOM`, and memory it cannot reclaim is not swapped."""
        if self.cgroup:
            self.cgroup.limit(None)
        info = self.worker.call(fn, *args)
        self.run("warm-up", -1, warm_up)
        evict(self.watched)
        if self.cgroup:
            self.cgroup.limit(self.cgroup.usage() + _HEADROOM)
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
        return (f"memory cgroup limit = warm-up memory + {_HEADROOM / _GiB:.1f} GiB, reached "
                f"{self.cgroup.limit_hits()} times")


# ---- printing ---------------------------------------------------------------------------------------

def _accelerate_available(w: Workload) -> bool:
    if importlib.util.find_spec("accelerate") is not None:
        return True
    if w.quick:
        print(f"note: {w.name} quick: accelerate is not installed, so the baseline is skipped")
        return False
    raise RuntimeError(f"{w.name} runs HF accelerate as its baseline, which is not installed: "
                       "pip install 'flexhelm[bench]' (or pip install accelerate)")


def _print_sweep(w: Workload, sweep: list, best) -> None:
    for policy, row in sweep:
        tput = w.batch * w.output_len / projected_s(row, w.batch, w.output_len)
        print(f"{w.name} sweep {label(policy)}: {tput:.2f} tok/s projected to {w.output_len} tokens; {_breakdown(row)}")
    print(f"{w.name} best policy: {label(best)} (the headline runs it)")


def _breakdown(row: OffloadRow) -> str:
    text = f"prefill {row.prefill_s:.2f} s + decode {row.decode_s:.2f} s"
    if row.fetch_s is not None:
        text += (f"; blocked on disk {row.io_wait_s:.2f} s, converting {row.fetch_s - row.io_wait_s:.2f} s, "
                 f"compute and the rest {row.busy_s - row.fetch_s:.2f} s")
    return text + f"; peak RSS {row.peak_rss / _GiB:.2f} GiB"


def _print_record(name: str, ours: list[OffloadRow], acc: list[OffloadRow], roof: Row,
                  machine: roofline.Machine, disk_bytes: int) -> None:
    """Absolute figures, for the record only: they move with the machine's load."""
    for rows in (ours, acc):
        if rows:
            m = median_row(rows)
            tput = statistics.median(r.throughput for r in rows)
            print(f"{name} {m.engine}: {tput:.2f} tok/s median; prefill {m.prefill_s:.2f} s + decode "
                  f"{m.decode_s:.2f} s, wall {m.wall_s:.2f} s, peak RSS "
                  f"{statistics.median(r.peak_rss for r in rows) / _GiB:.2f} GiB")
    print(f"{name} ours time (median run): {_breakdown(sorted(ours, key=lambda r: r.busy_s)[len(ours) // 2])}")
    peaks = ", ".join(f"m={m}: {f / 1e9:.0f}" for m, f in sorted(machine.gemm_flops.items(), reverse=True))
    print(f"{name} roofline: {roof.throughput:.2f} tok/s; prefill {roof.prefill_s:.2f} s + decode "
          f"{roof.decode_s:.2f} s; {disk_bytes / 1e9:.2f} GB from disk per step at "
          f"{machine.disk_bytes_per_s / 1e9:.2f} GB/s (O_DIRECT); "
          f"GEMM peak GFLOP/s {peaks}; RAM {machine.ram_bytes_per_s / 1e9:.1f} GB/s")


def _print_page_cache(name: str, rows: list[OffloadRow], limits: dict[str, str]) -> None:
    cached = [r.cached_before for r in rows if r.cached_before is not None]
    print(f"{name} page cache before each run: " + (
        f"at most {max(cached) / 2**20:.1f} MiB of the model and offload files cached (fincore)" if cached
        else "unchecked (no fincore)"))
    for engine, note in limits.items():
        mine = [r for r in rows if r.engine.startswith(engine) and r.disk_read is not None and r.requested]
        reads = ", ".join(f"{r.disk_read / 1e9:.2f}/{r.requested / 1e9:.2f} GB" for r in mine)
        print(f"{name} {engine}: {note}; read from the device / disk weights asked for, per run: {reads or 'n/a'}")
