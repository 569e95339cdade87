"""Runs under a RAM budget for the whole process (W1c, W4): each engine in a fresh worker process.

Ours is timed as `flexhelm profile --fit` times it (`harness.planning.measure`: a fresh process whose peak RSS,
load included, is its own, the model's pages evicted first). HF's count starts after `from_pretrained`, whose
transient fp16 + fp32 copies of the checkpoint an fp32 checkpoint would avoid; HF runs `generate` on consecutive
chunks of `batch` prompts, timed by wall clock as a whole.
"""

from __future__ import annotations

from pathlib import Path

from harness.bench import w1
from harness.bench.measure import Row
from harness.planning.measure import evict, measure_generate
from harness.planning.worker import Worker

_GiB = 2**30


def plan_for_budget(path: Path, work, limit: int):
    """(the `auto` plan of `work`, the HardwareSpec it used): the product's planner (`auto_policy.plan`) on this
    machine's profile (measured once, cached) for a process of `limit` bytes."""
    from harness.planning.auto_policy import Limits, hardware_for, plan
    from runtime.policy import Policy

    limits = Limits(host=limit)
    return plan(path, work, Policy(device="cpu"), limits), hardware_for(limits=limits)


def measure_ours(path: Path, policy, prompts: w1.Ids, n: int, offload: Path, label: str = "ours",
                 full_warm_up: bool = False) -> tuple[Row, int]:
    """(timings, peak RSS bytes) of one greedy generate of exactly `n` tokens under `policy`
    (`measure_generate`: its own process, after an untimed warm-up)."""
    m = measure_generate(path, policy, prompts, n, offload, label, full_warm_up)
    return Row(label, 0, m.wall_s, m.prefill_s, m.decode_s, m.tokens), m.peak_rss


def measure_hf(path: Path, batch: int, prompts: w1.Ids, n: int) -> tuple[Row, int]:
    """(timings, peak RSS bytes) of HF transformers `generate` over `prompts` in chunks of `batch`."""
    evict([path])
    with Worker(f"hf-{batch}", preload=__name__) as worker:
        return worker.call(_hf, path, batch, prompts, n)


def _hf(state: dict, path: Path, batch: int, prompts: w1.Ids, n: int) -> tuple[Row, int]:
    import time

    import torch

    from runtime.device import PeakMemory, read_status

    model = w1.load_hf(path)
    chunks = [torch.tensor(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
    w1.hf_generate(model, chunks[0][:1], 2)  # warm-up
    # The peak starts after loading: from_pretrained holds the fp16 checkpoint and its fp32 copy at once
    # (7.7 GiB for opt-1.3b), which an fp32 checkpoint would avoid; the budget is HF's to meet in generate.
    PeakMemory(torch.device("cpu")).reset()
    t0 = time.perf_counter()
    tokens = sum(w1.hf_generate(model, ids, n)[:, ids.shape[1]:].numel() for ids in chunks)
    wall = time.perf_counter() - t0
    return Row(f"hf-b{batch}", 0, wall, 0.0, wall, tokens), read_status("VmHWM") or 0


def describe(row: Row, peak: int, budget: int) -> str:
    over = " OVER BUDGET" if peak > budget else ""
    return f"{row.throughput:.2f} tok/s ({row.busy_s:.1f} s), peak RSS {peak / _GiB:.2f} GiB{over}"


def fit_fraction(path, budget: int, compress_weight=None, compute: str = "exact") -> float:
    """The largest of `weight_levels` whose resident bytes (the weights kept in memory whatever the
    placement included) stay within `budget`, as `WeightStore` places them: the fraction W2 and W3 run at."""
    import torch

    from runtime.checkpoint import Checkpoint
    from runtime.compressed import weight_codec
    from runtime.families import get_family
    from runtime.policy import Placement, Tier
    from runtime.weights import assign_tiers, layer_ranks, layer_weights, weight_levels

    codec = weight_codec(compress_weight, compute, torch.device("cpu"))
    ckpt = Checkpoint(path)
    planned = layer_weights(ckpt, get_family(ckpt.spec.family).build_layers(ckpt.spec), codec)
    ckpt.close()
    ranks = layer_ranks([sizes for _, sizes, _ in planned])

    def resident(f: float) -> int:
        return sum(size for (specs, sizes, _), rank in zip(planned, ranks)
                   for size, tier in zip(sizes, assign_tiers(specs, sizes, Placement(f, 0.0), Tier.DEVICE, rank))
                   if tier != Tier.DISK)

    return next((f for f in reversed(weight_levels(ckpt.spec, compress_weight, compute)) if resident(f) <= budget), 0.0)
