"""`kernels`: the CPU's three matmul paths on real models' decoder layers, side by side in one run.

For SmolLM2-135M, TinyLlama-1.1B and opt-1.3b (random weights of their shapes), one decoder layer's matrices are
multiplied by m = 1, 8, 16, 64, 256 rows (decode steps of m sequences, or a prefill of m tokens) through
`runtime.kernels.linear`, as the engine calls it, with the weights in each stored form:
- `fp32`: exact compute on fp32 weights (the CPU's compute dtype; fp16 weights are cast inside the same GEMM);
- `int4`: 4-bit weights in groups of 32 in the fused int4 kernel's form (bf16 activations), dequantized into
  fp32 row blocks from `Policy.int4_dense_rows` rows on (this machine's crossover, from its profile);
- `int8`: `compute: int8` (`runtime.int8`): int8 weights, activations quantized per token, int8 GEMM.
Each figure is the best of a few timed calls (`runtime.profiler.best_time`), interleaved path by path so that a
slower moment of the machine hits all three alike. Each path's error against an fp64 product of the fp32 weights
is printed too: what it trades for the speed.

Summary: `kernels int8/fp32 m=1:<r> m=8:<r> m=16:<r> m=64:<r> m=256:<r> int8/int4 m=...` (geometric means over the
three models). Quick mode: opt-tiny's shapes at m = 1 and 8, the default int4 crossover.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.bench.measure import OtherLoad
from harness.bench.workloads import Workload

MODELS = ("smollm2-135m", "tinyllama-1.1b", "opt-1.3b")
ROWS = (1, 8, 16, 64, 256)
PATHS = ("fp32", "int4", "int8")


@dataclass(frozen=True)
class KernelRow:
    model: str
    path: str
    m: int
    seconds: float
    """One decoder layer's matrices, best of the timed calls."""
    flops: float
    rel_error: float
    """|y - y_fp64| / |y_fp64| over the layer's products."""

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9

    def to_dict(self) -> dict:
        return {**asdict(self), "gflops": self.gflops}


def run(w: Workload, out_dir: Path) -> str:
    import torch

    from harness.bench.report import write_csv
    from harness.planning.auto_policy import load_hardware
    from harness.planning.random_models import spec
    from runtime.policy import INT4_DENSE_ROWS
    from runtime.shapes import shapes
    from runtime.weight_costs import int4_dense_rows

    other = OtherLoad()
    hw = None if w.quick else load_hardware(log=print)  # quick: the default crossover, no profile to measure
    rows: list[KernelRow] = []
    print(f"{w.name}: one decoder layer's matmuls, {torch.get_num_threads()} threads; GFLOP/s (relative error)")
    for name in ("opt-tiny",) if w.quick else MODELS:
        model = spec(name)
        dense_rows = INT4_DENSE_ROWS if hw is None else int4_dense_rows(hw, model)
        weights = _weights(shapes(model).decoder_matmuls, dense_rows)
        print(f"  {name}: {len(weights['fp32'])} matrices {shapes(model).decoder_matmuls}, int4 dense from "
              f"{dense_rows} rows")
        for m in (1, 8) if w.quick else ROWS:
            got = _measure(weights, m, reps=1 if w.quick else 5)
            rows += [KernelRow(name, p, m, got[p][0], got[p][1], got[p][2]) for p in PATHS]
            print(f"    m={m:4d}  " + "  ".join(f"{p} {got[p][1] / got[p][0] / 1e9:6.0f} ({got[p][2]:.1e})"
                                                for p in PATHS), flush=True)
    write_csv(rows, out_dir / f"{w.name}.csv")
    load = other.cores()
    print(f"{w.name} wrote {out_dir / f'{w.name}.csv'}; other processes used "
          f"{'n/a' if load is None else f'{load:.2f}'} of the cores on average")
    ms = sorted({r.m for r in rows})
    summary = f"{w.name} " + " ".join(
        f"{a}/{b} " + " ".join(f"m={m}:{_geomean(rows, a, b, m):.2f}" for m in ms)
        for a, b in (("int8", "fp32"), ("int8", "int4")))
    print(summary, flush=True)
    return summary


def _weights(matmuls, dense_rows: int) -> dict[str, list]:
    """Each path's stored form of random weights of `matmuls` ((N, K) each), plus their fp32 values."""
    import torch

    from runtime.compressed import WeightCodec
    from runtime.int8 import Int8Codec
    from runtime.policy import CAST_BLOCK_BYTES, QuantConfig

    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(n, k, generator=gen) / math.sqrt(k) for n, k in matmuls]
    int4, int8 = WeightCodec(QuantConfig(bits=4, group_size=32), cpu, dense_rows), Int8Codec(cpu)
    scratch = torch.empty(CAST_BLOCK_BYTES // 4)  # shared, as the engine's weights share one
    return {"fp32": fp32,
            "int4": [int4.decode(int4.encode(x), x.shape, scratch=scratch) if int4.uses_kernel(x.shape)
                     else x for x in fp32],
            "int8": [int8.decode(int8.encode(x), x.shape) for x in fp32]}


def _measure(weights: dict[str, list], m: int, reps: int) -> dict[str, tuple[float, float, float]]:
    """path -> (best seconds of the layer's matmuls at m rows, their FLOPs, relative error against fp64)."""
    import torch

    from runtime.kernels import linear
    from runtime.profiler import best_time

    gen = torch.Generator().manual_seed(m)
    xs = [torch.randn(m, w.shape[1], generator=gen) for w in weights["fp32"]]
    flops = sum(2 * m * w.shape[0] * w.shape[1] for w in weights["fp32"])
    refs = [x.double() @ w.double().t() for x, w in zip(xs, weights["fp32"])]
    out = {}
    with torch.inference_mode():
        best = {p: math.inf for p in PATHS}
        for _ in range(reps):  # interleaved: each round times every path once
            for p in PATHS:
                layer = weights[p]
                best[p] = min(best[p], best_time(lambda: [linear(x, w) for x, w in zip(xs, layer)], reps=1))  # noqa: B023
        for p in PATHS:
            ys = [linear(x, w).double() for x, w in zip(xs, weights[p])]
            err = math.sqrt(sum(float((y - r).pow(2).sum()) for y, r in zip(ys, refs))
                            / sum(float(r.pow(2).sum()) for r in refs))
            out[p] = (best[p], float(flops), err)
    return out


def _geomean(rows: list[KernelRow], a: str, b: str, m: int) -> float:
    pairs = {}
    for r in rows:
        if r.m == m:
            pairs.setdefault(r.model, {})[r.path] = r.seconds
    ratios = [v[b] / v[a] for v in pairs.values()]
    return math.exp(sum(map(math.log, ratios)) / len(ratios))
