"""W1c: the value of the policy. The `auto` policy under a RAM budget against HF at its best batch.

Setup (BENCHMARKS.md): opt-1.3b stored fp16, 64 prompts of 32 random tokens, 32 new tokens each, greedy,
fp32 compute, a budget of 6 GiB for the whole process. Ours: the policy `auto` plans with this machine's
profile and `--host-mem 6GiB` (it may keep fp16 weights in RAM, offload, and pick the batch shape). HF:
`generate` in chunks of b prompts for b in 1, 2, 4, ..., 64; a batch counts only if its process's peak
RSS stayed within the budget (larger batches are not tried once one goes over: memory grows with b).
Every run is a fresh worker process (budget.py). Figure: ours / best HF throughput within the budget.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness.bench import budget, report, w1
from harness.bench.measure import OtherLoad
from harness.bench.workloads import Workload
from harness.planning import random_models
from runtime.cost_model import Workload as CostWorkload

_GiB = 2**30


def run(w: Workload, out_dir: Path) -> str:
    spec = random_models.spec(w.model)
    path = random_models.ensure_model(w.model)
    other = OtherLoad()
    limit = w.ram_budget
    print(f"{w.name}: {w.model}, {w.batch} prompts, prompt {w.prompt_len}, output {w.output_len}, RAM budget "
          f"{limit / _GiB:.3g} GiB for the whole process", flush=True)
    prompts = w1.random_prompts(w, spec.vocab_size)
    plan, _ = budget.plan_for_budget(path, CostWorkload(w.prompt_len, w.output_len, w.batch), limit)
    print(f"{w.name} auto plan: {plan.policy.gpu_batch_size}x{plan.policy.num_gpu_batches}, weight_format "
          f"{plan.policy.weight_format.value}, weights on disk {plan.policy.weights.disk:.0%}, cache on disk "
          f"{plan.policy.cache.disk:.0%}; predicted {plan.prediction.throughput:.2f} tok/s, "
          f"{plan.prediction.memory['device'] / _GiB:.2f} GiB of RAM, bottleneck {plan.prediction.bottleneck}")
    with tempfile.TemporaryDirectory(prefix="flexhelm-w1c-") as scratch:
        ours, ours_peak = budget.measure_ours(path, plan.policy, prompts, w.output_len, Path(scratch))
    print(f"{w.name} ours (auto): {budget.describe(ours, ours_peak, limit)}", flush=True)
    hf = []
    b = 1
    while b <= w.batch:
        row, peak = budget.measure_hf(path, b, prompts, w.output_len)
        print(f"{w.name} hf batch {b}: {budget.describe(row, peak, limit)}", flush=True)
        hf.append((row, peak))
        if peak > limit:
            break
        b *= 2
    within = [row for row, peak in hf if peak <= limit]
    best = max(within, key=lambda r: r.throughput, default=None)
    w1.print_other_load(w.name, other.cores())
    rows = [ours, *(row for row, _ in hf)]
    print(f"{w.name} wrote {report.write_csv(rows, out_dir / f'{w.name}.csv')}")
    png = report.write_png(rows, out_dir / f"{w.name}.png", f"{w.name}: {w.model}, {limit / _GiB:.3g} GiB budget")
    if png:
        print(f"{w.name} wrote {png}")
    if ours_peak > limit:
        print(f"{w.name} warning: ours went over the budget ({ours_peak / _GiB:.2f} GiB): the plan's memory "
              "model underestimates this run")
    ratio = "n/a" if best is None else f"{ours.throughput / best.throughput:.2f}"
    if best is not None:
        print(f"{w.name} best HF within budget: {best.engine}")
    summary = f"{w.name} ours/hf_best={ratio}"
    print(summary, flush=True)
    return summary
