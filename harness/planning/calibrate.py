"""`flexhelm profile --fit`: fit the cost model's efficiency factors to a few short measured runs.

FlexGen's fit script meant to fit its constants to measured runs; this does it for our three factors
(`runtime.hardware.Calibration`). A random-weight model (`random_models`, built once; OPT-125m or a Llama-family
shape, `--fit-model`) generates a few short batches under policies that stress different terms:
all in RAM at several batch shapes (compute and per-call overhead) and weights read from disk (I/O). Per phase
of each run the cost model, uncalibrated, gives the compute seconds C, the number of (layer, micro-batch)
calls K and the I/O seconds D; then
- compute and call overhead: non-negative least squares of measured ~ a * C + o * K over the phases of
  the runs that read nothing from disk;
- io factor b and overlap v: over the disk runs' phases, the grid point with the least squared log error
  of measured ~ max(c, b * D) + (1 - v) * min(c, b * D), c = a * C + o * K (v = 1: I/O fully hidden);
- memory: the median of peak RSS / modelled RAM over the runs (at least 1).
Each run is a fresh worker process (`measure.measure_generate`: its peak RSS is its own, load included),
timed after an untimed warm-up, with the model's pages evicted first.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from harness.planning.auto_policy import model_spec

PROMPT_LEN, GEN_LEN, SEQS = 32, 8, 8
FIT_MODEL = "opt-125m"
FIT_MODELS = ("opt-125m", "smollm2-135m", "opt-tiny", "llama-tiny")
"""Random-weight models (`random_models`) the fit may run: the efficiency factors are of the machine and the engine,
but a Llama-shaped model measures the kernels (GQA, SwiGLU, rotary) that Llama-family plans use."""


def fit(hw, model: str = FIT_MODEL, log=print):
    """`hw` with a `Calibration` fitted to runs of the random-weight `model` on this machine."""
    import numpy as np
    from scipy.optimize import nnls

    from harness.planning import random_models
    from harness.planning.measure import measure_generate
    from runtime.cost_model import PHASES, Workload, predict
    from runtime.hardware import Calibration
    from runtime.policy import Placement, Policy

    path = random_models.ensure_model(model)
    spec = model_spec(path)
    work = Workload(PROMPT_LEN, GEN_LEN, SEQS)
    policies = [Policy(gpu_batch_size=1, device="cpu"), Policy(gpu_batch_size=8, device="cpu"),
                Policy(gpu_batch_size=2, num_gpu_batches=4, device="cpu"),
                Policy(gpu_batch_size=8, device="cpu", weight_format="checkpoint", weights=Placement(0.0, 0.0)),
                Policy(gpu_batch_size=4, num_gpu_batches=2, device="cpu", weight_format="checkpoint",
                       weights=Placement(0.5, 0.0))]
    identity = replace(hw, calibration=Calibration())
    compute_rows, io_rows, ram = [], [], []  # (C, K, D, measured) per phase; peak RSS / modelled per run
    prompts = [[4 + (i * 7 + j) % 1000 for j in range(PROMPT_LEN)] for i in range(SEQS)]
    with tempfile.TemporaryDirectory(prefix="flexhelm-fit-") as scratch:
        for i, policy in enumerate(policies):
            run = measure_generate(path, policy, prompts, GEN_LEN, Path(scratch) / str(i), "fit", True)
            measured = {"prefill": run.prefill_s, "decode": run.decode_s}
            pred = predict(identity, spec, work, policy)
            ram.append(run.peak_rss / (pred.memory["device"] + pred.memory["host"]))
            steps = {"prefill": 1, "decode": GEN_LEN - 1}
            blocks = -(-SEQS // policy.block_size)
            for phase in PHASES:
                n = spec.num_layers * steps[phase] * blocks
                terms = pred.terms[phase]
                c, k = n * terms["compute"], n * policy.num_gpu_batches
                d = n * max(v for name, v in terms.items() if name != "compute")
                (io_rows if policy.offloads() else compute_rows).append((c, k, d, measured[phase]))
            log(f"  fit run {policy.gpu_batch_size}x{policy.num_gpu_batches}, weights on disk "
                f"{policy.weights.disk:.0%}: prefill {measured['prefill']:.3f} s, decode {measured['decode']:.3f} s "
                f"(uncalibrated model: {pred.prefill_s:.3f} s, {pred.decode_s:.3f} s)")
    (a, o), _ = nnls(np.array([[c, k] for c, k, _, _ in compute_rows]), np.array([m for *_, m in compute_rows]))
    a = a if a > 0 else 1.0
    b, v = _fit_io(a, o, io_rows)
    memory = max(1.0, statistics.median(ram))
    calibration = Calibration(compute=float(a), io=b, call_overhead_s=float(o), memory=memory, overlap=v)
    log(f"  calibration: compute x{a:.2f}, io x{b:.2f}, {o * 1e6:.0f} us per layer call, RAM x{memory:.2f}, "
        f"overlap {v:.1f}")
    return replace(hw, calibration=calibration)


def _fit_io(a: float, o: float, rows: list) -> tuple[float, float]:
    """(io factor, overlap) minimizing the squared log error over the disk runs' phases (grid search: two
    parameters, a handful of points)."""
    import numpy as np

    if not rows:
        return 1.0, 1.0
    best = (np.inf, 1.0, 1.0)
    for b in np.geomspace(0.25, 8.0, 61):
        for v in np.linspace(0.0, 1.0, 11):
            err = 0.0
            for c, k, d, m in rows:
                comp, io = a * c + o * k, b * d
                err += np.log((max(comp, io) + (1 - v) * min(comp, io)) / m) ** 2
            best = min(best, (err, float(b), float(v)))
    return best[1], best[2]
