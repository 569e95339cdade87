"""W2: offloading, ours against HF accelerate's disk offload, both streaming most weights from disk.

Setup: a random-weight model stored fp16 in safetensors (harness/planning/random_models.py), at most
`weight_ram_bytes` of weights resident in RAM (0.5 GiB for opt-1.3b's 2.6 GB), the rest read from disk at every
step; the same random prompts, greedy, exactly `output_len` new tokens, fp32 compute on both sides (fp16 matmuls crawl
on this CPU).
- Ours: `Engine(Policy(weights=Placement(f, 0), weight_format="checkpoint"))`, so resident weights stay
  fp16 and disk weights are read in place from the safetensors file. The embedding tables (0.2 GiB) stay in
  RAM; `f` is 0 (every decoder weight streams from disk) or the budget filled (`resident_fractions`). The
  policy is the fastest of f x overlap on/off x (batch x 1, batch/2 x 2 micro-batches), measured on a
  shortened output and projected to the full one; that policy alone runs against the baseline.
- Accelerate: `from_pretrained(dtype=float32, device_map=..., offload_folder=...)`. transformers 5 maps
  the offloaded weights of a safetensors checkpoint in place (nothing is written to the offload folder):
  each forward reads their fp16 bytes through `safe_open` (mmap) and casts them to fp32, the same bytes
  from disk as ours. `device_map="auto"` with `max_memory={"cpu": "0.5GiB"}` would put all of opt-1.3b
  on disk (accelerate reserves room for its largest layer, the 0.4 GB fp32 embedding, inside the
  budget), so `accelerate_device_map` fills the budget with resident fp32 modules in order instead:
  embedding (and its tied head), positions, final norm (0.40 GiB); every decoder layer on disk.
  The engines' worker-side code is in w2_engines.py.

Page cache: each engine runs in its own worker process (harness/planning/worker.py), in its own memory cgroup
where the machine allows one (pagecache.py). Before every run the pages of the model folder and the offload
folders are evicted (posix_fadvise DONTNEED) and `fincore` counts what is left. During a run ours drops
what it reads itself; accelerate's mmap reads leave pages behind, which its cgroup bounds: after an
untimed warm-up each worker's limit is set to its memory then + `HEADROOM` (its transient buffers and a
page cache well below one step's weights, so no step finds the previous step's weights cached).
Verified per run: bytes the worker read from the device (/proc/<pid>/io read_bytes) against the bytes of
disk-resident weights it asked for (ours: its DiskIO counter; accelerate: offloaded weights x forwards).

Roofline (roofline.py): per step max(compute at the measured GEMM peak, RAM traffic, (checkpoint bytes -
budget) at the disk's rate serving the model's weights to the runtime's reader), summed over prefill and decode
steps. The machine is measured again right before each timed run of ours, and each run is divided by the roof
of its own moment: the GEMM rate, RAM and disk bandwidth here move by up to 2x within an hour, and a roof taken
once, minutes away from the runs, gave fractions from 0.58 to 1.25 for the same code. The summary's fraction is
the median over the runs; the record prints each run's.
Ours' time is split by the weight store's own clocks (`WeightStore.fetch_s`, `wait_s`): blocked on disk
reads, the rest of fetch, compute (the rest; on the CPU it includes the fp16 -> fp32 casts, which `linear`
does block by block).
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

from harness.bench import report, roofline, w1, w2_engines
from harness.bench.budget import fit_fraction
from harness.bench.measure import OtherLoad, Row, alternate, median_ratio, median_row
from harness.bench.offload_side import (
    SWEEP_TOKENS,
    OffloadRow,
    Side,
    breakdown,
    label,
    print_page_cache,
    print_sweep,
    projected_s,
    sweep_policies,
)
from harness.bench.workloads import Workload
from harness.planning import random_models

_GiB = 2**30


def run(w: Workload, out_dir: Path) -> str:
    spec = random_models.spec(w.model)
    path = random_models.ensure_model(w.model)
    baseline = _accelerate_available(w)
    other = OtherLoad()
    budget = w.weight_ram_bytes
    print(f"{w.name}: {w.model} fp16, at most {budget / _GiB:.3g} GiB of weights in RAM, batch {w.batch}, "
          f"prompt {w.prompt_len}, output {w.output_len}, {w.repeats} A/B pairs, {torch.get_num_threads()} threads",
          flush=True)
    prompts = w1.random_prompts(w, spec.vocab_size)

    files = sorted(path.glob("*.safetensors"))
    steps = roofline.generate_steps(w.batch, w.prompt_len, w.output_len)
    disk_bytes = max(0, sum(f.stat().st_size for f in files) - budget)
    fractions = resident_fractions(path, budget)

    with tempfile.TemporaryDirectory(prefix="flexhelm-w2-") as scratch, ExitStack() as stack:
        watched = [path, Path(scratch)]  # the model and both engines' offload folders
        ours = Side("ours", watched, stack)
        acc = Side("accelerate", watched, stack) if baseline else None
        if acc:  # loaded first: a baseline that cannot load fails before the long sweep
            # accelerate's heap grows over a whole run (~2.5 GiB more for opt-1.3b): warm up for a whole one
            acc_tiers = acc.load(w.output_len, w2_engines.load_accelerate, path, budget,
                                 Path(scratch) / "accelerate", prompts)

        # Sweep: ours under each policy on a shortened output, ranked by the time projected to the full one
        n = min(SWEEP_TOKENS, w.output_len)
        sweep = []
        for policy in sweep_policies(w, fractions):
            ours.load(2, w2_engines.load_ours, path, policy, scratch, prompts, budget)
            sweep.append((policy, ours.run("ours-sweep", 0, n, label(policy))[0]))
        best = min(sweep, key=lambda ps: projected_s(ps[1], w.batch, w.output_len))[0]

        # Side by side: the best policy against accelerate, A B A B; the machine measured before each of ours
        tiers = ours.load(2, w2_engines.load_ours, path, best, scratch, prompts, budget)
        machines: list[roofline.Machine] = []

        def ours_run(rep: int):
            machines.append(roofline.measure(spec, steps, w.ram_probe_bytes, reps=3, disk_model=path))
            return ours.run("ours", rep, w.output_len, label(best))

        pairs = alternate(ours_run, lambda rep: acc.run("accelerate", rep, w.output_len) if acc else None,
                          w.repeats)
        if acc:
            w1.check_same_ids(w.name, pairs[0][0][1], pairs[0][1][1])
        limits = {s.name: s.limit_note() for s in (ours, acc) if s}
    cores = other.cores()  # after the workers are joined, so their CPU time is this run's own

    # Report
    ours_rows = [a[0] for a, _ in pairs]
    acc_rows = [b[0] for _, b in pairs if b is not None]
    roofs = [Row("roofline", i, *_roof_seconds(spec, steps, m, disk_bytes), ours_rows[0].tokens)
             for i, m in enumerate(machines)]
    fractions = [roof.busy_s / row.busy_s for roof, row in zip(roofs, ours_rows)]
    mid = sorted(range(len(fractions)), key=fractions.__getitem__)[len(fractions) // 2]
    roof, fraction_of_roof = roofs[mid], fractions[mid]  # the median run's roof
    ratio = median_ratio(list(zip(ours_rows, acc_rows)), lambda r: r.throughput) if acc_rows else None
    peak = statistics.median(r.peak_rss for r in ours_rows) / _GiB
    print(f"{w.name} ours: weights fraction {best.weights.device:.4f} -> GiB in RAM / on disk "
          f"{(tiers['device'] + tiers['host']) / _GiB:.3f} / {tiers['disk'] / _GiB:.3f}")
    if acc_rows:
        print(f"{w.name} accelerate: fp32 weights GiB in RAM {acc_tiers['cpu'] / _GiB:.3f}, fp16 GiB read from disk "
              f"per forward {acc_tiers['disk'] / _GiB:.3f}")
    print_sweep(w, sweep, best)
    _print_record(w.name, ours_rows, acc_rows, roof, machines[mid], disk_bytes)
    _print_roofs(w.name, machines, roofs, fractions)
    print_page_cache(w.name, ours_rows + acc_rows + [r for _, r in sweep], limits)
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


def resident_fractions(path: Path, budget: int, compress_weight=None) -> tuple[float, ...]:
    """Weights fractions kept in RAM that the sweep tries. Compressed: the largest that fits the budget
    (`fit_fraction`). fp16: that one (q/k/v in 12 of opt-1.3b's 24 layers, 12% fewer bytes read per step) and
    none of the decoder layers (the tables alone, 0.2 GiB). Reading fewer bytes, the filled budget should run at
    least as fast, but what a read costs also depends on where its staging buffers land in memory
    (`runtime.disk.aligned_empty`; docs/MEASUREMENTS.md), so the sweep measures both rather than assume it."""
    fit = fit_fraction(path, budget, compress_weight)
    return (fit,) if compress_weight or fit == 0 else (0.0, fit)


# ---- printing ---------------------------------------------------------------------------------------

def _accelerate_available(w: Workload) -> bool:
    if importlib.util.find_spec("accelerate") is not None:
        return True
    if w.quick:
        print(f"note: {w.name} quick: accelerate is not installed, so the baseline is skipped")
        return False
    raise RuntimeError(f"{w.name} runs HF accelerate as its baseline, which is not installed: "
                       "pip install 'flexhelm[bench]' (or pip install accelerate)")


def _roof_seconds(spec, steps, machine: roofline.Machine, disk_bytes: int) -> tuple[float, float, float]:
    """(busy, prefill, decode) seconds at the roofline of `machine`."""
    prefill, decode = roofline.roofline(spec, steps, machine, disk_bytes)
    return prefill + decode, prefill, decode


def _print_roofs(name: str, machines: list[roofline.Machine], roofs: list[Row], fractions: list[float]) -> None:
    """Each timed run of ours against the machine measured just before it."""
    for i, (m, roof, f) in enumerate(zip(machines, roofs, fractions)):
        peak = max(m.gemm_flops.values()) / 1e9
        print(f"{name} run {i}: roof {roof.throughput:.2f} tok/s (GEMM peak {peak:.0f} GFLOP/s, RAM "
              f"{m.ram_bytes_per_s / 1e9:.1f} GB/s, disk {m.disk_bytes_per_s / 1e9:.2f} GB/s), ours at {f:.2f} of it")


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
    print(f"{name} ours time (median run): {breakdown(sorted(ours, key=lambda r: r.busy_s)[len(ours) // 2])}")
    peaks = ", ".join(f"m={m}: {f / 1e9:.0f}" for m, f in sorted(machine.gemm_flops.items(), reverse=True))
    print(f"{name} roofline: {roof.throughput:.2f} tok/s; prefill {roof.prefill_s:.2f} s + decode "
          f"{roof.decode_s:.2f} s; {disk_bytes / 1e9:.2f} GB from disk per step at "
          f"{machine.disk_bytes_per_s / 1e9:.2f} GB/s (the runtime's reader, measured before the median run); "
          f"GEMM peak GFLOP/s {peaks}; RAM {machine.ram_bytes_per_s / 1e9:.1f} GB/s")


