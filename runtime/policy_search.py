"""Policy search (FlexGen section 4.3): an LP over placement per batch shape, and an outer search over shapes.

For each (gpu_batch_size, num_gpu_batches), compression choice and weight format, the cost model's terms
(`runtime.cost_model.terms`, linear in the nine placement fractions) become a cvxpy LP:
    minimize  l * (tau_prefill + (n - 1) * tau_decode)
    with      tau_phase = ov * max(terms) + (1 - ov) * sum(terms)   (ov: calibrated overlap, 0 without)
    s.t.      epigraph of the max: m_phase >= every time term of the phase
              peak memory of every tier in both phases <= that tier's capacity
              each kind's fractions sum to 1, all >= 0; a fraction that would use a link of zero
              bandwidth is 0
The LP is built once per structure with cvxpy Parameters and re-solved for every shape (milliseconds).
Its solution, rounded, and the all-on-device policy are then evaluated exactly by `predict` (which counts
offload-only buffers only when something is offloaded); the best feasible one wins.

The runtime keeps whole tensors in a tier, so only some weight fractions are what they say (`weight_levels`:
the boundaries between a layer's tensors; between two, the runtime keeps the lower one's bytes and a tensor
more, or fewer). Given the levels, the weight fractions of a solution are moved to the levels on either side
and the LP is solved again with them fixed (cache and activations take what the weights leave): a plan
never counts on bytes the runtime would not keep, nor keeps bytes it did not count.

When nothing fits, `InfeasibleError` names the binding tier and the least memory of it that would work,
from one more LP per tier: minimize that tier's peak with the other tiers' limits kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from runtime.cost_model import (
    MEMORY_HEADROOM,
    PHASES,
    TIERS,
    VARS,
    CostTerms,
    Prediction,
    Workload,
    capacities,
    num_blocks,
    predict,
    terms,
)
from runtime.errors import PolicyError
from runtime.hardware import HardwareSpec
from runtime.policy import Placement, Policy, QuantConfig, WeightFormat
from runtime.spec import ModelSpec
from runtime.weight_costs import int4_dense_rows

_GiB = 2**30
_ROUND = 1e-4  # fractions are rounded to this: the runtime places whole tensors anyway


class InfeasibleError(PolicyError):
    """No policy fits the memory of the tiers."""


@dataclass(frozen=True)
class Plan:
    """The chosen policy and what the cost model predicts for it."""

    policy: Policy
    prediction: Prediction
    binding: str
    """The memory constraint that is tight (`device memory`, ...), or `none`."""
    candidates: int
    """Batch shapes x compression x format tried."""
    capacities: dict[str, int]
    """The memory per tier (the machine's, or the user's limits); plans fill device and host memory only
    up to `cost_model.MEMORY_HEADROOM` of it."""

    def to_json(self) -> dict:
        p = self.prediction
        return {"policy": self.policy.to_json(), "throughput_tok_s": p.throughput, "prefill_s": p.prefill_s,
                "decode_s": p.decode_s, "memory_bytes": p.memory, "bottleneck": p.bottleneck,
                "binding": self.binding, "candidates": self.candidates,
                "capacity_bytes": dict(self.capacities), "terms_s_per_layer": p.terms}


def batch_candidates(limit: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to `limit`, and `limit` itself (FlexGen tries 48 and the like)."""
    out, p = {limit}, 1
    while p <= limit:
        out.add(p)
        if p * 3 // 2 <= limit and p >= 2:
            out.add(p * 3 // 2)
        p *= 2
    return sorted(out)


def search(hw: HardwareSpec, model: ModelSpec, work: Workload, base: Policy | None = None,
           batch_sizes: list[int] | None = None, num_batches: list[int] | None = None,
           compressions: list[tuple[QuantConfig | None, QuantConfig | None]] | None = None,
           max_block: int = 4096,
           weight_levels: Callable[[QuantConfig | None, str], list[float]] | None = None,
           computes: list[str] | None = None) -> Plan:
    """The policy with the highest predicted throughput. `base` gives the fields the search leaves alone
    (device, overlap, cpu_attention, ...; not `int4_dense_rows`, set from `hw`); `batch_sizes` / `num_batches`
    restrict the shapes (default: all up to `num_seqs`, or `max_block`); `compressions`: (weights, cache) configs
    to try (default: the base's); `computes`: `Policy.compute` values to try (default: the base's; `int8` is
    tried without weight compression, which it replaces);
    `weight_levels`: the weight fractions the runtime realises, per weight compression and compute (default: any)."""
    base = base or Policy()
    base = replace(base, int4_dense_rows=int4_dense_rows(hw, model))  # this machine's kernel crossover
    limit = work.num_seqs or max_block
    sizes = batch_sizes or batch_candidates(limit)
    counts = num_batches or [k for k in batch_candidates(limit) if k & (k - 1) == 0]  # powers of 2
    compressions = compressions or [(base.compress_weight, base.compress_cache)]
    numerics = _numerics(computes or [base.compute], compressions)
    formats = [WeightFormat.COMPUTE]
    if not hw.accelerator and model.torch_dtype != "float32":
        formats.append(WeightFormat.CHECKPOINT)  # fp16 in RAM, converted per layer: half the bytes
    lp = _LP()
    best: Prediction | None = None
    tried = 0
    for compute, qw, qc in numerics:
        levels = weight_levels(qw, compute) if weight_levels else None
        for fmt in formats if compute == "exact" else formats[:1]:  # int8 codes have no stored format to choose
            for g in sizes:
                for nb in counts:
                    if nb > 1 and g * nb > limit:  # a block beyond the sequences only pads (nb = 1 is kept)
                        break
                    shape = replace(base, gpu_batch_size=g, num_gpu_batches=nb, compress_weight=qw,
                                    compress_cache=qc, weight_format=fmt, compute=compute)
                    tried += 1
                    found = _best_for_shape(hw, model, work, shape, lp, levels)
                    if found is None:
                        break  # a larger block needs more memory still
                    if best is None or found.throughput > best.throughput:
                        best = found
    if best is None:
        raise InfeasibleError(explain_infeasible(hw, model, work, replace(
            base, gpu_batch_size=min(sizes), num_gpu_batches=min(counts)), numerics, formats))
    return Plan(best.policy, best, _binding(hw, best), tried, capacities(hw, usable=False))


def _numerics(computes: list[str], compressions) -> list[tuple[str, QuantConfig | None, QuantConfig | None]]:
    """(compute, weight compression, cache compression) to try: int8 compute stores its weights as int8 codes
    itself, so it goes without weight compression."""
    return list(dict.fromkeys((c, None if c == "int8" else qw, qc) for c in computes for qw, qc in compressions))


def _best_for_shape(hw, model, work, shape: Policy, lp: _LP, levels: list[float] | None) -> Prediction | None:
    candidates = [replace(shape, weights=Placement(), cache=Placement(), activations=Placement())]
    t = terms(hw, model, work, shape, assume_offload=True)
    solution = lp.solve(t, hw)
    if solution is None:
        solutions = []
    elif levels is None:  # (fractions, weights placement): None rounds the solution's weights like the rest
        solutions = [(solution, None)]
    else:
        solutions = _at_levels(t, hw, lp, solution, levels)
    for found, weights in solutions:
        for snap in (round, math.floor):
            x = _rounded(found, snap)
            candidates.append(replace(shape, weights=Placement(x["wg"], x["wc"]) if weights is None else weights,
                                      cache=Placement(x["cg"], x["cc"]), activations=Placement(x["hg"], x["hc"])))
    best = None
    for policy in candidates:
        p = predict(hw, model, work, policy)
        if all(p.fits(hw).values()) and p.throughput > 0 and (best is None or p.throughput > best.throughput):
            best = p
    return best


def _at_levels(t: CostTerms, hw: HardwareSpec, lp: _LP, x: dict[str, float], levels: list[float]) -> list:
    """(fractions, weights placement) with the weights at the levels on either side of the solution's device
    and device + host fractions, the LP solved again for the rest (the solution itself where it is on them)."""

    def around(v: float) -> set[float]:
        return {max((lv for lv in levels if lv <= v + 1e-9), default=0.0),
                min((lv for lv in levels if lv >= v - 1e-9), default=1.0)}

    out = []
    for wg, wc in sorted({(g, m - g) for g in around(x["wg"]) for m in around(x["wg"] + x["wc"]) if m >= g}):
        fixed = {"wg": wg, "wc": wc, "wd": max(0.0, 1.0 - wg - wc)}
        same = all(abs(x[k] - v) < 1e-9 for k, v in fixed.items())
        again = x if same else lp.solve(t, hw, fixed)
        if again is not None:
            out.append((again, Placement(wg, wc)))
    return out


def _binding(hw: HardwareSpec, p: Prediction) -> str:
    caps = capacities(hw)
    tight = [t for t in TIERS if caps[t] > 0 and p.memory[t] >= 0.97 * caps[t]]
    return ", ".join(f"{t} memory" for t in tight) or "none"


class _LP:
    """The placement LP with its coefficients as cvxpy Parameters, built once per number of time terms."""

    def __init__(self) -> None:
        self._problems: dict[int, tuple] = {}

    def _build(self, k: int):
        import cvxpy as cp

        nv = len(VARS)
        x = cp.Variable(nv, nonneg=True)
        peak = cp.Variable(2)  # the largest term of each phase
        P = {name: cp.Parameter(shape, name=name) for name, shape in (
            ("A", (2 * k, nv)), ("a", 2 * k), ("M", (6, nv)), ("m", 6), ("zero", nv), ("hide", 2), ("lin", nv),
            ("lo", nv), ("hi", nv))}
        cons = [x[0:3].sum() == 1, x[3:6].sum() == 1, x[6:9].sum() == 1, cp.multiply(P["zero"], x) == 0,
                P["M"] @ x <= P["m"], x >= P["lo"], x <= P["hi"]]
        rows = P["A"] @ x + P["a"]
        cons += [peak[i] >= rows[i * k:(i + 1) * k] for i in range(2)]
        # steps * (ov * max + (1 - ov) * sum): the max through `peak`, the sum folded into `lin` (DPP)
        prob = cp.Problem(cp.Minimize(P["hide"] @ peak + P["lin"] @ x), cons)
        return prob, x, P

    def solve(self, t: CostTerms, hw: HardwareSpec, fixed: dict[str, float] | None = None) -> dict[str, float] | None:
        """Fractions minimizing the block time under the memory limits (with the `fixed` ones as given), or
        None when infeasible."""
        import cvxpy as cp
        import numpy as np

        names = list(t.time["prefill"])
        if len(names) not in self._problems:
            self._problems[len(names)] = self._build(len(names))
        prob, x, P = self._problems[len(names)]
        lins = [t.time[p][n] for p in PHASES for n in names]
        zero = [0.0] * len(VARS)
        A = []
        for lin in lins:
            row = []
            for i, c in enumerate(lin.coef):
                if math.isinf(c):
                    zero[i], c = 1.0, 0.0
                row.append(c)
            A.append(row)
        caps = capacities(hw)
        mem = [t.memory[p][tier] for p in PHASES for tier in TIERS]
        # numpy arrays: cvxpy reads nested lists as columns
        P["A"].value, P["a"].value = np.array(A), np.array([lin.const for lin in lins])
        P["M"].value = np.array([lin.coef for lin in mem]) / _GiB
        P["m"].value = np.array([(caps[tier] - lin.const) / _GiB for lin, tier in zip(mem, TIERS * 2)])
        P["zero"].value = np.array(zero)
        fixed = fixed or {}
        P["lo"].value = np.array([fixed.get(v, 0.0) for v in VARS])
        P["hi"].value = np.array([fixed.get(v, 1.0) for v in VARS])
        steps = np.array([t.layers, t.layers * (t.gen_len - 1)], dtype=float)
        P["hide"].value = steps * t.overlap
        sums = np.array(A).reshape(2, len(names), -1).sum(1)  # (phase, var): each phase's terms added up
        # Ties (I/O hidden under compute leaves many optima) go to the device, then the host: a placement
        # the runtime runs with fewer transfers. One millionth of the time: never outweighs a real cost.
        scale = 1e-6 * max(1e-9, float(steps @ np.array(P["a"].value).reshape(2, -1).sum(1)))
        P["lin"].value = (steps * (1 - t.overlap)) @ sums + scale * np.array([0.0, 1.0, 2.0] * 3)
        try:
            prob.solve(solver=cp.CLARABEL)
        except cp.error.SolverError:
            prob.solve(solver=cp.SCS)
        if prob.status not in ("optimal", "optimal_inaccurate") or x.value is None:
            return None
        return dict(zip(VARS, x.value))


def _rounded(x: dict[str, float], snap) -> dict[str, float]:
    """Fractions snapped to multiples of `_ROUND` by `snap` (round or floor), each kind summing to 1 with
    disk taking the remainder: nearest keeps a 0 or 1 exact, floor never adds bytes to a full memory tier.
    Nothing the LP kept off disk goes there (a disk without bandwidth must stay empty)."""
    out = {}
    for kind in "wch":
        g = min(1.0, max(0.0, snap(x[kind + "g"] / _ROUND + 1e-6) * _ROUND))
        c = min(1.0 - g, max(0.0, snap(x[kind + "c"] / _ROUND + 1e-6) * _ROUND))
        if x[kind + "d"] < _ROUND / 2:
            g, c = (g, 1.0 - g) if x[kind + "c"] > 0 else (1.0, 0.0)
        out.update({kind + "g": g, kind + "c": c, kind + "d": max(0.0, 1.0 - g - c)})
    return out


def explain_infeasible(hw: HardwareSpec, model: ModelSpec, work: Workload, shape: Policy,
                       numerics, formats) -> str:
    """Why nothing fits at the smallest shape: the tier whose memory is furthest from enough, and how much
    of it would be enough with the other tiers as they are."""
    import cvxpy as cp
    import numpy as np

    caps = capacities(hw)
    need = {tier: math.inf for tier in TIERS}
    for compute, qw, qc in numerics:
        for fmt in formats if compute == "exact" else formats[:1]:
            t = terms(hw, model, work, replace(shape, compress_weight=qw, compress_cache=qc, weight_format=fmt,
                                               compute=compute), assume_offload=True)
            for tier in TIERS:
                x = cp.Variable(len(VARS), nonneg=True)
                peak = cp.Variable()
                cons = [x[0:3].sum() == 1, x[3:6].sum() == 1, x[6:9].sum() == 1]
                for p in PHASES:
                    for other in TIERS:
                        lin = t.memory[p][other]
                        expr = (lin.const + np.array(lin.coef) @ x) / _GiB
                        cons.append(peak >= expr if other == tier else expr <= caps[other] / _GiB)
                prob = cp.Problem(cp.Minimize(peak), cons)
                prob.solve(solver=cp.CLARABEL)
                if prob.status in ("optimal", "optimal_inaccurate"):
                    need[tier] = min(need[tier], float(peak.value) * _GiB)
    blocks = num_blocks(work, shape)
    what = (f"{model.family} with {model.num_parameters() / 1e9:.3g}B parameters, prompt {work.prompt_len}, "
            f"output {work.gen_len}, batch {shape.gpu_batch_size}x{shape.num_gpu_batches} ({blocks} block(s))")
    need = {t: need[t] / (1 if t == "disk" else MEMORY_HEADROOM) for t in TIERS}  # memory to have, headroom in
    caps = capacities(hw, usable=False)
    options = [(need[t] - caps[t], t) for t in TIERS if math.isfinite(need[t])]
    have = ", ".join(f"{t} {caps[t] / _GiB:.2f} GiB" for t in TIERS)
    if not options:
        return f"no policy fits {what} in any tier ({have}); it needs more memory on every tier"
    extra, tier = min(options)
    if extra <= 0:  # memory would do: the placements that fit need a link of zero bandwidth
        return (f"no policy runs {what} in finite time ({have}): the placements that fit need a link whose "
                "bandwidth is 0 in the hardware spec")
    alternatives = "; ".join(f"or {t} >= {need[t] / _GiB:.2f} GiB" for _, t in sorted(options)[1:])
    return (f"no policy fits {what}: the binding tier is {tier} memory ({caps[tier] / _GiB:.2f} GiB); the "
            f"smallest {tier} memory that would work is {need[tier] / _GiB:.2f} GiB with the other tiers as "
            f"they are ({have})" + (f"; {alternatives}" if alternatives else ""))
