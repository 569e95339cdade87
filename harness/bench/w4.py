"""W4: the policy search against a grid of hand-written policies, and the cost model's prediction error.

Two setups, each a RAM budget for the whole process (budget.py runs every policy in a fresh worker
process, model pages evicted before each run):
- W1c's: opt-1.3b stored fp16, 64 prompts, prompt 32, output 32, 6 GiB;
- W2's: the same model, 16 prompts, prompt 32, output 32, 2 GiB: W2's "0.5 GiB of weights in RAM" as a
  budget the policy can spend as it likes (the process itself and its buffers take the rest).
For each, >= 20 hand-written policies (batch shapes, weight format, weights / cache on disk, overlap)
and `auto` are measured. Figures: auto / the best grid policy that stayed within the budget (the lower of
the two setups), and the median over every measured policy of |predicted - measured| / measured
throughput, the prediction from the same hardware profile the plan used. `--quick` measures 3 grid
policies per setup on a tiny model.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from harness.bench import budget, report, w1
from harness.bench.measure import OtherLoad
from harness.bench.workloads import W4_SETUPS, Workload
from harness.planning import random_models
from harness.planning.auto_policy import model_spec

_GiB = 2**30
QUICK_GRID = 3


def grid_w1c():
    """21 policies for W1c's setup: batch shapes x weight format, some offloading, one without overlap."""
    from runtime.policy import Placement, Policy

    shapes = [(8, 1), (16, 1), (32, 1), (64, 1), (16, 2), (32, 2), (8, 4), (16, 4)]
    out = [Policy(gpu_batch_size=g, num_gpu_batches=nb, weight_format=fmt, device="cpu")
           for fmt in ("checkpoint", "compute") for g, nb in shapes]
    out += [Policy(gpu_batch_size=g, weight_format="checkpoint", weights=Placement(0.5, 0.0), device="cpu")
            for g in (16, 64)]
    out += [Policy(gpu_batch_size=g, weight_format="checkpoint", cache=Placement(0.0, 0.0), device="cpu")
            for g in (32, 64)]
    return out + [Policy(gpu_batch_size=64, weight_format="checkpoint", overlap=False, device="cpu")]


def grid_w2():
    """20 policies for W2's setup: resident fraction x batch shape, overlap off, cache on disk, fp32 in RAM."""
    from runtime.policy import Placement, Policy

    def p(f, g, nb, **kw):
        return Policy(gpu_batch_size=g, num_gpu_batches=nb, weights=Placement(f, 0.0), device="cpu",
                      **{"weight_format": "checkpoint", **kw})

    shapes = [(16, 1), (8, 2), (4, 4), (2, 8)]
    out = [p(f, g, nb) for f in (0.0, 0.15, 0.3) for g, nb in shapes]
    out += [p(f, g, nb, overlap=False) for f in (0.0, 0.3) for g, nb in shapes[:2]]
    out += [p(0.0, g, nb, cache=Placement(0.0, 0.0)) for g, nb in shapes[:2]]
    return out + [p(0.0, g, nb, weight_format="compute") for g, nb in shapes[:2]]


def run(w: Workload, out_dir: Path) -> str:
    from runtime.cost_model import Workload as CostWorkload
    from runtime.cost_model import predict

    path = random_models.ensure_model(w.model)
    spec_model = model_spec(path)
    other = OtherLoad()
    setups = list(zip(W4_SETUPS, (w, replace(w, batch=max(1, w.batch // 4), ram_budget=2 * _GiB)),
                      (grid_w1c(), grid_w2())))
    setups = [s for s in setups if not w.setups or s[0] in w.setups]
    title = w.name if not w.setups else f"{w.name}-{'-'.join(s[0] for s in setups)}"  # a part: its own CSV
    ratios, errors, rows = [], [], []
    for name, s, grid in setups:
        grid = grid[:QUICK_GRID] if w.quick else grid
        grid = [replace(p, gpu_batch_size=min(p.gpu_batch_size, s.batch)) for p in grid]
        prompts = w1.random_prompts(s, spec_model.vocab_size)
        work = CostWorkload(s.prompt_len, s.output_len, s.batch)
        plan, hw = budget.plan_for_budget(path, work, s.ram_budget)
        print(f"{w.name} {name} setup: {s.batch} prompts, budget {s.ram_budget / _GiB:.3g} GiB; {len(grid)} "
              f"hand-written policies + auto", flush=True)
        measured = []  # (label, policy, row, peak, predicted throughput)
        with tempfile.TemporaryDirectory(prefix="flexhelm-w4-") as scratch:
            for i, policy in enumerate([plan.policy, *grid]):
                label = "auto" if i == 0 else f"grid{i:02d}"
                row, peak = budget.measure_ours(path, policy, prompts, s.output_len, Path(scratch) / label,
                                                f"{name}-{label}")
                pred = predict(hw, spec_model, work, policy).throughput
                measured.append((label, policy, row, peak, pred))
                print(f"{w.name} {name} {label} {_short(policy)}: {budget.describe(row, peak, s.ram_budget)}; "
                      f"predicted {pred:.2f} tok/s", flush=True)
        auto = measured[0][2]
        fitting = [m for m in measured[1:] if m[3] <= s.ram_budget]
        best = max(fitting, key=lambda m: m[2].throughput, default=None)
        if best is not None:
            ratios.append(auto.throughput / best[2].throughput)
            print(f"{w.name} {name} auto/best = {ratios[-1]:.2f} (best: {best[0]} {_short(best[1])})")
        errors += [abs(pred - row.throughput) / row.throughput for _, _, row, _, pred in measured if row.throughput]
        rows += [m[2] for m in measured]
    w1.print_other_load(w.name, other.cores())
    print(f"{w.name} wrote {report.write_csv(rows, out_dir / f'{title}.csv')}")
    ratio = f"{min(ratios):.2f}" if ratios else "n/a"
    summary = f"{title} auto/best={ratio} median_abs_pred_err={statistics.median(errors):.2f}"
    print(summary, flush=True)
    return summary


def _short(p) -> str:
    return (f"{p.gpu_batch_size}x{p.num_gpu_batches} {p.weight_format.value} w-disk {p.weights.disk:.0%} "
            f"c-disk {p.cache.disk:.0%}{'' if p.overlap else ' no-overlap'}")
