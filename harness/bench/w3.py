"""W3: 4-bit weights and KV cache against fp16, both ours, on W2's offloading setup.

Same model, weight RAM budget, prompts and page-cache control as W2 (w2.py, offload_side.py): each side
runs in its own worker process and memory cgroup, the model's and offload folders' pages are evicted
before every run. fp16: the checkpoint's fp16 weights, disk ones read in place from the safetensors
file. 4-bit: weight matrices and the KV cache quantized group-wise (4 bits, group 64, min-max), the
disk-resident ones prepared once in the offload folder (outside the timed runs), so each step reads
about 0.28x the fp16 bytes; decode matmuls run in torch's fused int4 kernel. The resident fractions
each side tries are W2's (`w2.resident_fractions`: fp16 none of the decoder layers and the budget filled, 4-bit
the budget filled, counted in its stored sizes). Each side runs its fastest policy of the W2 sweep; then
A B pairs of full runs, median ratio of throughputs.
"""

from __future__ import annotations

import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

from harness.bench import report, w1, w2_engines
from harness.bench.measure import OtherLoad, alternate, median_ratio
from harness.bench.offload_side import (
    SWEEP_TOKENS,
    Side,
    breakdown,
    label,
    print_page_cache,
    print_sweep,
    projected_s,
    sweep_policies,
)
from harness.bench.w2 import resident_fractions
from harness.bench.workloads import Workload
from harness.planning import random_models

_GiB = 2**30


def run(w: Workload, out_dir: Path) -> str:
    from runtime.policy import QuantConfig

    spec = random_models.spec(w.model)
    path = random_models.ensure_model(w.model)
    other = OtherLoad()
    budget = w.weight_ram_bytes
    q4 = QuantConfig(bits=4, group_size=64)
    variants = {"fp16": {}, "4bit": {"compress_weight": q4, "compress_cache": q4}}
    print(f"{w.name}: {w.model} fp16 vs 4-bit weights + cache, at most {budget / _GiB:.3g} GiB of weights in RAM, "
          f"batch {w.batch}, prompt {w.prompt_len}, output {w.output_len}, {w.repeats} A/B pairs, "
          f"{torch.get_num_threads()} threads", flush=True)
    prompts = w1.random_prompts(w, spec.vocab_size)
    with tempfile.TemporaryDirectory(prefix="flexhelm-w3-") as scratch, ExitStack() as stack:
        watched = [path, Path(scratch)]
        best, sweeps, tiers, sides = {}, {}, {}, {}
        for name, fields in variants.items():
            side = sides[name] = Side(name, watched, stack)
            fractions = resident_fractions(path, budget, fields.get("compress_weight"))
            offload = str(Path(scratch) / name)  # 4-bit: quantized here once, on the first load
            sweeps[name] = []
            for policy in sweep_policies(w, fractions, **fields):
                side.load(2, w2_engines.load_ours, path, policy, offload, prompts, budget)
                row = side.run(f"{name}-sweep", 0, min(SWEEP_TOKENS, w.output_len), label(policy))[0]
                sweeps[name].append((policy, row))
            best[name] = min(sweeps[name], key=lambda ps: projected_s(ps[1], w.batch, w.output_len))[0]
            tiers[name] = side.load(2, w2_engines.load_ours, path, best[name], offload, prompts, budget)
        pairs = alternate(lambda rep: sides["4bit"].run("4bit", rep, w.output_len, label(best["4bit"])),
                          lambda rep: sides["fp16"].run("fp16", rep, w.output_len, label(best["fp16"])), w.repeats)
        limits = {name: s.limit_note() for name, s in sides.items()}
    cores = other.cores()

    q_rows, f_rows = [a[0] for a, _ in pairs], [b[0] for _, b in pairs]
    ratio = median_ratio(list(zip(q_rows, f_rows)), lambda r: r.throughput)
    for name, rows in (("fp16", f_rows), ("4bit", q_rows)):
        t = tiers[name]
        print_sweep(w, sweeps[name], best[name])
        m = sorted(rows, key=lambda r: r.busy_s)[len(rows) // 2]  # the median run
        print(f"{w.name} {name}: {statistics.median(r.throughput for r in rows):.2f} tok/s median; weights GiB in "
              f"RAM / on disk {(t['device'] + t['host']) / _GiB:.3f} / {t['disk'] / _GiB:.3f}; {breakdown(m)}")
    print_page_cache(w.name, q_rows + f_rows, limits)
    w1.print_other_load(w.name, cores)
    rows = [*(r for s in sweeps.values() for _, r in s), *q_rows, *f_rows]
    print(f"{w.name} wrote {report.write_csv(rows, out_dir / f'{w.name}.csv')}")
    png = report.write_png([*q_rows, *f_rows], out_dir / f"{w.name}.png",
                           f"{w.name}: {w.model}, 4-bit vs fp16, {budget / _GiB:.3g} GiB weights in RAM")
    if png:
        print(f"{w.name} wrote {png}")
    summary = f"{w.name} 4bit/fp16={ratio:.2f}"
    print(summary, flush=True)
    return summary
