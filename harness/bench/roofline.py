"""Roofline of a `generate` call: the time this machine needs at least, measured in the same run.

Roofline time = sum over the prefill step and each decode step of max(compute, memory), where
- compute = FLOPs / GEMM peak. The peak is measured **per m** (the rows of the step's GEMMs: batch x
  prompt in prefill, batch in decode): `F.linear` GFLOP/s of every weight shape the model multiplies at
  that m (the family's matrices, `runtime.shapes`: OPT's h x 3h, h x h, h x ffn, ffn x h; Llama's fused q/k/v,
  o, gate/up and down; h x vocab for the head), best shape taken as "the peak at m". Skinny GEMMs run far
  below the large-m peak here (m=8: ~31 vs m=256: ~200 GFLOP/s), so one
  global peak would make decode look 5x more compute-rich than this CPU can ever be. The probe reuses
  one weight, so shapes that fit the L3 cache run cache-hot: that is the compute roof; streaming the
  weights from RAM is the memory roof below.
  FLOPs: the linear layers (2*m*k*n each); the attention, 2 matmuls of 2*head_dim FLOPs per
  (query, key) pair and query head, counting only the pairs a causal mask keeps (in prefill query j sees
  j + 1 keys, half of the full square; `runtime.shapes.attention_flops`); the head only for the rows whose
  logits are needed (the last position of each sequence in prefill, every row in decode). Attention runs at
  the step's GEMM peak. Norms, biases, activations, rotary and the embedding lookup are not counted (a lower
  bound).
- memory = bytes read / RAM bandwidth: every weight once per step in its stored form (fp16: the engine
  converts blocks of rows cache-hot, `runtime.kernels.CastWeight`, so RAM serves 2 bytes a weight) plus the
  whole fp32 KV cache (its KV heads) after the step's write. RAM bandwidth is measured by summing a large fp32
  tensor.
- disk (offloading workloads only): the weight bytes that cannot stay in RAM, read once per step, over
  the rate at which the disk serves the model's weights to the runtime's reader (`disk_bandwidth`),
  measured before and after the timed runs, the best taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.profiler import best_time
from runtime.shapes import attention_flops, kv_values_per_token, shapes
from runtime.spec import ModelSpec

_FP32 = 4  # bytes
_STORED = 2  # bytes of a weight: benchmark models are stored fp16 (harness/planning/random_models.py)


@dataclass(frozen=True)
class Step:
    """One forward pass of a generate call over the whole batch."""

    batch: int
    q_len: int
    """New tokens per sequence (prompt length in prefill, 1 in decode)."""
    kv_len: int
    """Cached tokens per sequence once this step's keys are written."""

    @property
    def m(self) -> int:
        return self.batch * self.q_len


@dataclass(frozen=True)
class Machine:
    """What the roofline divides by, measured on this machine."""

    gemm_flops: dict[int, float]
    """m -> best fp32 FLOP/s over the model's weight shapes at that m."""
    ram_bytes_per_s: float
    disk_bytes_per_s: float = 0.0
    """Sequential read bandwidth of the disk; 0 when not measured (nothing is read from disk)."""


def generate_steps(batch: int, prompt_len: int, output_len: int) -> list[Step]:
    """Prefill yields the first token; each further token costs one decode step."""
    return [Step(batch, prompt_len, prompt_len)] + [Step(batch, 1, prompt_len + s) for s in range(1, output_len)]


def gemms(spec: ModelSpec, step: Step) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count): `count` products of (m, k) activations with (k, n) weights in this step, from the
    family's weight layout (`runtime.shapes`)."""
    z = shapes(spec)
    out = [(step.m, k, n, spec.num_layers) for n, k in z.decoder_matmuls]
    out += [(step.m, k, n, 1) for n, k in z.embedding_matmuls]
    return out + [(step.batch, k, n, 1) for n, k in z.head_matmuls]  # head: the last position of each sequence


def weight_params(spec: ModelSpec) -> int:
    """Parameters that every step reads: the decoder layers, the embedding's and the head's matrices (the tables
    are indexed, a few rows a step, unless the head multiplies by them; a lower bound)."""
    z = shapes(spec)
    return spec.num_layers * z.decoder_params + sum(n * k for n, k in (*z.embedding_matmuls, *z.head_matmuls))


def bytes_read(spec: ModelSpec, step: Step) -> int:
    kv_cache = spec.num_layers * step.batch * step.kv_len * kv_values_per_token(spec)
    return _STORED * weight_params(spec) + _FP32 * kv_cache


def step_time(spec: ModelSpec, step: Step, machine: Machine, disk_bytes: int = 0) -> float:
    """Roofline seconds of one step that also reads `disk_bytes` of weights from disk."""
    compute = sum(count * 2 * m * k * n / machine.gemm_flops[m] for m, k, n, count in gemms(spec, step))
    compute += spec.num_layers * attention_flops(spec, step.batch, step.q_len, step.kv_len) / machine.gemm_flops[step.m]
    disk = disk_bytes / machine.disk_bytes_per_s if disk_bytes else 0.0
    return max(compute, bytes_read(spec, step) / machine.ram_bytes_per_s, disk)


def roofline(spec: ModelSpec, steps: list[Step], machine: Machine, disk_bytes: int = 0) -> tuple[float, float]:
    """(prefill seconds, decode seconds) at the roofline; steps[0] is the prefill; every step reads
    `disk_bytes` of weights from disk."""
    times = [step_time(spec, s, machine, disk_bytes) for s in steps]
    return times[0], sum(times[1:])


def measure(spec: ModelSpec, steps: list[Step], ram_probe_bytes: int, reps: int = 5,
            disk_model: Path | None = None) -> Machine:
    """GEMM peak at every m the steps use, over the shapes used at that m, the RAM bandwidth and, given
    `disk_model` (a checkpoint folder), the disk bandwidth reading its weights."""
    shapes_at: dict[int, set[tuple[int, int]]] = {}
    for step in steps:
        for m, k, n, _ in gemms(spec, step):
            shapes_at.setdefault(m, set()).add((k, n))
    peaks = {m: max(gemm_flops_per_s(m, k, n, reps) for k, n in sorted(shapes)) for m, shapes in shapes_at.items()}
    disk = disk_bandwidth(disk_model) if disk_model is not None else 0.0
    return Machine(peaks, ram_bandwidth(ram_probe_bytes, reps), disk)


def gemm_flops_per_s(m: int, k: int, n: int, reps: int) -> float:
    """fp32 `F.linear` FLOP/s of (m, k) @ (k, n), best of `reps` after a warm-up (best = least disturbed)."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    with torch.inference_mode():
        return 2 * m * k * n / best_time(lambda: F.linear(x, w), reps)


def ram_bandwidth(nbytes: int, reps: int) -> float:
    """Bytes/s of a streaming read: summing an fp32 tensor too large for the caches."""
    t = torch.ones(nbytes // _FP32)  # ones, not empty: every page touched before timing
    with torch.inference_mode():
        return t.nbytes / best_time(t.sum, reps)


def disk_bandwidth(model: Path, reps: int = 2) -> float:
    """Bytes/s at which this disk serves the weights a step streams: every weight of the checkpoint in `model`
    that may go to disk (all but the tables) read once, layer after layer, through the runtime's own reader
    (`WeightStore` at Placement(0, 0): O_DIRECT spans, reader threads, `PREFETCH_DEPTH` layers ahead) with no
    compute in between; best of `reps` (the least disturbed). Why not a plain sequential read of the file: on a
    virtual disk it can run well below the reader's rate (docs/MEASUREMENTS.md: about half, at any queue depth),
    and the roof would then lie below what the runs do."""
    from runtime.checkpoint import Checkpoint
    from runtime.disk import DiskIO
    from runtime.families import get_family
    from runtime.policy import Placement
    from runtime.weights import WeightStore

    ckpt, io = Checkpoint(model), DiskIO()
    try:
        layers = get_family(ckpt.spec.family).build_layers(ckpt.spec)
        store = WeightStore(ckpt, layers, torch.device("cpu"), torch.float16, torch.float32, Placement(0, 0), io)

        def sweep() -> None:
            for i in range(len(layers)):
                store.fetch_ahead(i, len(layers), wrap=False)

        with torch.inference_mode():
            before = io.bytes_read
            seconds = best_time(sweep, reps, warm_up=False)
            return (io.bytes_read - before) / reps / seconds
    finally:
        io.close()
        ckpt.close()
