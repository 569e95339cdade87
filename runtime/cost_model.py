"""The cost model: time and peak memory of a `Policy` on a `HardwareSpec`, after FlexGen section 4 and A.3.

Pure functions of (HardwareSpec, ModelSpec, Workload, Policy); no torch. Every term is *linear in the
nine placement fractions* (weights, cache, activations on device / host / disk), written as a `Lin`, so
`predict` evaluates a policy by plugging its fractions in and `runtime.policy_search` hands the very same
terms to an LP: one model, no second copy of the formulas.

Per decoder layer, for one block of B = gpu_batch_size x num_gpu_batches sequences (FlexGen eq. 1-2):
    T = l * (T_prefill + (n - 1) * T_decode),  T_phase = max(compute, h2d, d2h, disk_read, disk_write)
with `overlap` (FlexGen overlaps all five); without it the terms add up, and a fitted `overlap` factor
in between says how much really hides (on a 2-core CPU the disk reader threads share the cores).
Compute counts the linear layers' FLOPs at the measured rate for that many rows (m = micro-batch x
tokens), attention FLOPs (causal pairs only) at the device's or the CPU's attention rate, dequantization
and dtype conversion; I/O terms count the bytes of weights, cache and activations crossing each link
(A.3 lists the same terms). Memory per tier is the home of each kind of data plus the working buffers
of one micro-batch.

Where this departs from FlexGen's `cost_model.py`, and why:
- Embedding and head weights and the head's FLOPs are spread over the l decoder layers (FlexGen leaves
  them out): on small models they are up to 8 % of bytes and a third of decode FLOPs at vocab 50k.
- The GEMM rate depends on m (FlexGen: one prefill and one decode figure): on a CPU, decode at m = 8
  runs 6x below m = 256, which is what makes the batch size matter at all there.
- A CPU-only host has no host <-> device link: the device tier is RAM; weights stored in another dtype
  than the compute dtype (fp16, computed in fp32) are cast inside the matmul, cache-hot, which costs no
  more than the matmul itself; on an accelerator a conversion per step is added to compute.
- Compression changes both bytes (packed sizes, as the runtime stores them) and compute: the fused int4
  kernel's rate where the runtime uses it, else dequantization at the measured rate before the matmul;
  `compute: int8` the int8 GEMM's measured rate on int8 bytes (`runtime.weight_costs`).
- Memory terms that exist only when something is offloaded (staging buffers) are counted when the
  placement offloads; the LP, which cannot express "if", counts them always (`assume_offload`).
- A fitted `Calibration` scales compute, I/O and RAM and adds a per-call overhead (FlexGen fits nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from runtime.hardware import HardwareSpec
from runtime.policy import CAST_BLOCK_BYTES, PREFETCH_DEPTH, ROW_CHUNK, Policy, WeightFormat, layout_of
from runtime.shapes import attention_flops, kv_values_per_token, prefix_computed_once, shapes, working_width
from runtime.spec import ModelSpec
from runtime.weight_costs import (
    DTYPE_BYTES,
    TIERS,
    compute_dtype,
    head_kind,
    int4_unpack_rate,
    uses_int4_kernel,
    weight_bytes,
)

VARS = ("wg", "wc", "wd", "cg", "cc", "cd", "hg", "hc", "hd")
"""Placement fractions: weights (w), cache (c), activations (h) on device (g), host (c), disk (d)."""
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Lin:
    """const + sum(coef[i] * VARS[i]): seconds or bytes as a linear function of the placement."""

    const: float = 0.0
    coef: tuple[float, ...] = (0.0,) * len(VARS)

    @classmethod
    def of(cls, const: float = 0.0, **coefs: float) -> Lin:
        return cls(const, tuple(coefs.get(v, 0.0) for v in VARS))

    def __add__(self, other: Lin) -> Lin:
        return Lin(self.const + other.const, tuple(a + b for a, b in zip(self.coef, other.coef)))

    def __mul__(self, k: float) -> Lin:
        return Lin(self.const * k, tuple(c * k for c in self.coef))

    __rmul__ = __mul__

    def __call__(self, x: dict[str, float]) -> float:
        """The value at fractions `x`; a coefficient of inf (a link of zero bandwidth) costs nothing at 0."""
        return self.const + sum(c * x[v] for c, v in zip(self.coef, VARS) if x[v] > 1e-12)


@dataclass(frozen=True)
class Workload:
    """What is generated: `num_seqs` prompts of `prompt_len` tokens, `gen_len` new tokens each."""

    prompt_len: int
    gen_len: int
    num_seqs: int | None = None
    """None: as many as one block holds (FlexGen's throughput setting)."""
    scoring: bool = False
    """The prompts are only scored (`Engine.score`, `score_rolling`): one prefill pass that keeps no KV cache
    and runs the head at every position; `gen_len` is then 1."""
    shared_prefix: int = 0
    """Tokens every prompt begins with (few-shot examples): the engine computes them once per micro-batch where
    `runtime.shapes.prefix_computed_once` says so; times only (memory is planned for unshared blocks)."""

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_seqs is not None and self.num_seqs < 1:
            raise ValueError(f"num_seqs must be >= 1, got {self.num_seqs}")
        if self.scoring and self.gen_len != 1:
            raise ValueError(f"a scoring workload generates nothing: gen_len must be 1, got {self.gen_len}")
        if not 0 <= self.shared_prefix < self.prompt_len:
            raise ValueError(f"shared_prefix must lie in [0, prompt_len), got {self.shared_prefix}")

    def covers(self, need: Workload) -> bool:
        """Whether a policy planned for this workload also provisions `need` (prompts as long, as many new
        tokens, and a KV cache where `need` keeps one)."""
        return (self.prompt_len >= need.prompt_len and self.gen_len >= need.gen_len
                and (need.scoring or not self.scoring))


@dataclass(frozen=True)
class CostTerms:
    """Per-layer seconds of each term per phase, and peak bytes per (phase, tier), all linear in VARS."""

    time: dict[str, dict[str, Lin]]
    """phase -> term (`compute`, `h2d`, `d2h`, `disk_read`, `disk_write`) -> seconds per layer per step."""
    memory: dict[str, dict[str, Lin]]
    """phase -> tier -> peak bytes."""
    layers: int
    gen_len: int
    overlap: float
    """Share of the non-largest terms hidden under the largest: 0 without overlap (they add up)."""

    def phase_seconds(self, values) -> float:
        """max + (1 - overlap) * (the rest): FlexGen's max at overlap 1, the serial sum at 0."""
        values = list(values)
        return max(values) + (1 - self.overlap) * (sum(values) - max(values))


@dataclass(frozen=True)
class Prediction:
    """What the cost model says about one policy on one workload."""

    policy: Policy
    prefill_s: float
    """Seconds of prefill for all sequences."""
    decode_s: float
    """Seconds of decode for all sequences."""
    throughput: float
    """Generated tokens per second of prefill + decode (FlexGen's definition)."""
    memory: dict[str, float]
    """Peak bytes per tier (the larger of prefill and decode)."""
    bottleneck: str
    """The term that sets the time of the phase that takes longest, e.g. `decode: disk_read`."""
    terms: dict[str, dict[str, float]] = field(default_factory=dict)
    """Seconds per layer per step of every term, per phase."""

    def fits(self, hw: HardwareSpec) -> dict[str, bool]:
        caps = capacities(hw)
        return {t: self.memory[t] <= caps[t] * (1 + 1e-9) + 1 for t in TIERS}


MEMORY_HEADROOM = 0.95
"""Share of device and host memory a plan may fill: allocator slack and what the model does not count
(tokenizer, Python objects). FlexGen's search plans within 90 % of GPU and CPU memory."""


def capacities(hw: HardwareSpec, usable: bool = True) -> dict[str, int]:
    """Bytes per tier: what a plan may fill (`usable`: RAM tiers less the headroom) or what there is."""
    f = MEMORY_HEADROOM if usable else 1.0
    return {"device": int(hw.device_mem * f), "host": int(hw.host_mem * f), "disk": hw.disk_mem}


def fractions(policy: Policy) -> dict[str, float]:
    x = {}
    for kind, p in (("w", policy.weights), ("c", policy.cache), ("h", policy.activations)):
        x.update({kind + "g": p.device, kind + "c": p.host, kind + "d": p.disk})
    return x


def _per(nbytes: float, rate: float) -> float:
    """Seconds to move `nbytes` at `rate`; inf for a link of zero bandwidth (nothing may use it)."""
    if nbytes == 0:
        return 0.0
    return nbytes / rate if rate > 0 else math.inf


@dataclass(frozen=True)
class _Sizes:
    """Per-layer averages of the model's parameters and FLOPs (embedding and head spread over the layers), from
    its weight layout (`runtime.shapes`)."""

    matrix_params: float
    head_matrix_params: float
    """Parameters of the head's widest matrix (the vocabulary projection), in total, not spread."""
    flops_per_token: float
    """Matmul FLOPs of one token through one decoder layer (and its share of the embedding's)."""
    head_flops_per_row: float
    """Head FLOPs of one row, per layer (spread)."""
    kv_token: float
    """Bytes of one token's keys and values in one layer's cache, as stored."""


def _sizes(model: ModelSpec, policy: Policy, cdt_bytes: int) -> _Sizes:
    z, nl = shapes(model), model.num_layers
    q = policy.compress_cache
    # a compressed cache stores a record per (KV head, token): codes, then an fp16 scale and minimum per group
    per_head = layout_of((1, model.head_dim), q).nbytes if q is not None else model.head_dim * cdt_bytes
    return _Sizes(z.matrix_params / nl, max(n * k for n, k in z.head_matmuls),
                  z.token_flops() + z.embedding_flops() / nl, z.head_flops() / nl,
                  2 * model.num_kv_heads * per_head)


def terms(hw: HardwareSpec, model: ModelSpec, work: Workload, policy: Policy,
          assume_offload: bool = False) -> CostTerms:
    """The cost terms of `policy`'s discrete choices (batch shape, compression, format, overlap) as linear
    functions of its placement; `assume_offload`: count offload-only buffers whatever the placement."""
    acc, cal = hw.accelerator, hw.calibration
    ckpt_bytes = DTYPE_BYTES.get(model.torch_dtype, 4)
    cdt = compute_dtype(hw, model)
    cdt_bytes = DTYPE_BYTES[cdt]
    z = _sizes(model, policy, cdt_bytes)
    g, nb = policy.gpu_batch_size, policy.num_gpu_batches
    B, s, n, nl = g * nb, work.prompt_len, work.gen_len, model.num_layers
    h, nh, hd, V = model.hidden_size, model.num_heads, model.head_dim, model.vocab_size
    x = fractions(policy)
    offload_w = assume_offload or x["wd"] > 0
    keeps_cache = not work.scoring
    offload_c = keeps_cache and (assume_offload or x["cd"] > 0 or (acc and not policy.cpu_attention and x["cc"] > 0))

    # Bytes per layer of the weights in each tier's stored form (`weight_bytes`).
    qw = policy.compress_weight
    kernel = uses_int4_kernel(hw, model, qw)
    wb = weight_bytes(hw, model, policy)
    stored = {t: wb.stored[t] / nl for t in TIERS}
    kept = {t: wb.kept[t] / nl for t in TIERS}
    w_io = stored["disk"]  # what crosses a link: host and disk weights keep the checkpoint's (or packed) form
    ram = "host" if acc else "device"  # where staging buffers, the process and kept weights live
    w_disk = w_io - kept["disk"]

    # Compute (FLOPs at measured rates), conversion and dequantization, per layer.
    int8 = policy.compute == "int8"

    def gemm(rows: int, per_row_flops: float, head_rows: int) -> float:
        head = 0.0 if not head_rows else (
            head_rows * nb * z.head_flops_per_row / hw.matmul_rate(head_kind(hw, model, policy), head_rows))
        if int8:
            return rows * nb * per_row_flops / hw.matmul_rate("int8", rows) + head
        if kernel and rows < policy.int4_dense_rows:
            return rows * nb * per_row_flops / hw.matmul_rate("int4", rows) + head
        # the compute dtype's GEMM; 4-bit kernel weights dequantized for each chunk of rows (layers.by_rows)
        unpack = nb * math.ceil(rows / ROW_CHUNK) * z.matrix_params / int4_unpack_rate(hw) if kernel else 0.0
        return rows * nb * per_row_flops / hw.matmul_rate(cdt, rows) + unpack + head

    # int8 codes are multiplied as stored (the activations' quantization is in the measured int8 rate): no term
    convert = Lin()
    if qw is None and not int8:
        # On the CPU the cast happens inside the matmul, a cache-hot block at a time (runtime.kernels.CastWeight),
        # measured no slower than the matmul of fp32 weights alone: no term of its own. An accelerator converts
        # the disk weights of an fp32 checkpoint to its 16-bit compute dtype once per step.
        if ckpt_bytes != cdt_bytes and acc:
            convert = Lin.of(wd=_per(z.matrix_params * cdt_bytes, hw.convert))
    elif qw is not None and not kernel:
        convert = Lin.of(_per(z.matrix_params, hw.dequantize))
    calls = Lin.of(nb * cal.call_overhead_s)
    cache_codec = 0.0 if policy.compress_cache is None or not keeps_cache else 1.0
    kvv = kv_values_per_token(model)

    def attention_decode() -> Lin:
        flops = 4 * B * nh * hd * min(s + n / 2, model.sliding_window or math.inf)
        off = hw.cpu_attention if (acc and policy.cpu_attention) else hw.attention_decode
        return Lin.of(cg=_per(flops, hw.attention_decode), cc=_per(flops, off), cd=_per(flops, off))

    # a shared prefix: one (1, p) row per micro-batch, then the rows' own s - p tokens over all s keys
    p = prefix_computed_once(work.shared_prefix, s, 0 if work.scoring else n, model.sliding_window, work.scoring)
    own = g * (s - p)
    prefill_flops = gemm(own, z.flops_per_token, own if work.scoring else g)  # scoring: the head everywhere
    prefill_flops += gemm(p, z.flops_per_token, 0) if p else 0.0
    attn_p = _per(attention_flops(model, B, s - p, s) + attention_flops(model, nb, p, p), hw.attention_prefill)
    quant_p = _per(cache_codec * B * s * kvv, hw.dequantize)
    compute_p = (Lin.of(prefill_flops + attn_p + quant_p) + convert) * cal.compute + calls
    dequant_g = _per(cache_codec * B * (s + n / 2) * kvv, hw.dequantize)
    compute_g = (Lin.of(gemm(g, z.flops_per_token, g) + dequant_g) + attention_decode() + convert) * cal.compute
    compute_g = compute_g + calls

    # I/O per layer (FlexGen A.3): weights, cache and activations crossing each link.
    act = {"prefill": B * s * h * cdt_bytes, "decode": B * h * cdt_bytes}
    kv_new = {"prefill": B * s * z.kv_token * keeps_cache, "decode": B * z.kv_token}
    io = cal.io
    time: dict[str, dict[str, Lin]] = {}
    for phase, compute in (("prefill", compute_p), ("decode", compute_g)):
        a, k_new = act[phase], kv_new[phase]
        k_read = B * (s + n / 2) * z.kv_token if phase == "decode" else 0.0
        t = {"compute": compute}
        if acc:
            read_host_cache = 0.0 if policy.cpu_attention else k_read
            t["h2d"] = Lin.of(wc=_per(w_io, hw.host_to_device), wd=_per(w_io, hw.host_to_device),
                              hc=_per(a, hw.host_to_device), hd=_per(a, hw.host_to_device),
                              cc=_per(read_host_cache, hw.host_to_device),
                              cd=_per(read_host_cache, hw.host_to_device)) * io
            t["d2h"] = Lin.of(cc=_per(k_new, hw.device_to_host), cd=_per(k_new, hw.device_to_host),
                              hc=_per(a, hw.device_to_host), hd=_per(a, hw.device_to_host)) * io
        t["disk_read"] = Lin.of(wd=_per(w_disk, hw.disk_to_host), cd=_per(k_read, hw.disk_to_host),
                                hd=_per(a, hw.disk_to_host)) * io
        t["disk_write"] = Lin.of(cd=_per(k_new, hw.host_to_disk), hd=_per(a, hw.host_to_disk)) * io
        time[phase] = t

    # Peak memory per tier: homes of weights, cache and activations, plus one micro-batch's working set.
    cache_home = nl * B * (s + n) * z.kv_token * keeps_cache
    memory: dict[str, dict[str, Lin]] = {}
    for phase in PHASES:
        rows = g * s if phase == "prefill" else g
        working = cdt_bytes * rows * working_width(model)
        if phase == "prefill":  # SDPA tiles the scores, never all at once
            if not work.scoring or model.sliding_window is not None:  # scoring is right-padded: no mask
                working += B * s * s  # the block's (B, 1, s, s) boolean masks
        else:  # a micro-batch's scores over its keys
            working += cdt_bytes * g * nh * (s + n)
        working += 2 * B * V * 4  # fp32 logits of the block's last positions and the sampler's copy
        if cache_codec:
            working += g * (s + n) * kvv * cdt_bytes  # one micro-batch's cache dequantized for attention
        staging = {"device": working, "host": 0.0}
        converts = not kernel and not int8 and (qw is not None or (offload_w and ckpt_bytes != cdt_bytes) or acc
                                  or policy.weight_format == WeightFormat.CHECKPOINT)
        if (converts and not acc and qw is None) or kernel:  # CPU block casts (runtime.kernels.CastWeight)
            staging["device"] += CAST_BLOCK_BYTES
        elif converts:  # one layer's matrices in the compute dtype, reused across layers, and the head's own
            staging["device"] += (z.matrix_params + z.head_matrix_params) * cdt_bytes  # (another shape)
        if offload_w:  # staging slots of a layer's disk weights
            staging[ram] += (PREFETCH_DEPTH + 1) * w_disk
        if offload_c:  # the staging ring: two (2, S, micro-batch, kvH, D) buffers
            staging[ram] += 2 * (s + n) * g * z.kv_token
        staging[ram] += hw.base_mem
        kept_home = {t: Lin.of(wd=nl * kept[ram]) if t == ram else Lin() for t in ("device", "host")}
        memory[phase] = {
            "device": (Lin.of(staging["device"], wg=nl * stored["device"], cg=cache_home, hg=act[phase])
                       + kept_home["device"]) * (cal.memory if not acc else 1.0),
            "host": (Lin.of(staging["host"], wc=nl * stored["host"], cc=cache_home, hc=act[phase])
                     + kept_home["host"]) * cal.memory,
            "disk": Lin.of(0.0, wd=nl * w_disk, cd=cache_home, hd=act[phase]),
        }
    return CostTerms(time, memory, nl, n, cal.overlap if policy.overlap else 0.0)


def block_seconds(t: CostTerms, x: dict[str, float]) -> tuple[float, float, dict[str, dict[str, float]]]:
    """(prefill seconds, decode seconds) of one block at fractions `x`, and every term's per-layer value."""
    values = {p: {name: lin(x) for name, lin in t.time[p].items()} for p in PHASES}
    per_layer = {p: t.phase_seconds(values[p].values()) for p in PHASES}
    return t.layers * per_layer["prefill"], t.layers * (t.gen_len - 1) * per_layer["decode"], values


def num_blocks(work: Workload, policy: Policy) -> int:
    return 1 if work.num_seqs is None else math.ceil(work.num_seqs / policy.block_size)


def predict(hw: HardwareSpec, model: ModelSpec, work: Workload, policy: Policy) -> Prediction:
    """Time, throughput, peak memory per tier and bottleneck of `policy` on this workload."""
    shape = policy
    if work.num_seqs is not None and policy.block_size > work.num_seqs:  # one block of all the sequences
        g = min(policy.gpu_batch_size, work.num_seqs)
        shape = replace(policy, gpu_batch_size=g, num_gpu_batches=math.ceil(work.num_seqs / g))
    t = terms(hw, model, work, shape)
    x = fractions(policy)
    prefill, decode, values = block_seconds(t, x)
    blocks = num_blocks(work, shape)
    seqs = work.num_seqs if work.num_seqs is not None else shape.block_size
    total = blocks * (prefill + decode)
    phase = "decode" if decode >= prefill else "prefill"
    bottleneck = f"{phase}: {max(values[phase], key=values[phase].get)}"
    memory = {tier: max(t.memory[p][tier](x) for p in PHASES) for tier in TIERS}
    throughput = seqs * work.gen_len / total if total > 0 else math.inf
    return Prediction(policy, blocks * prefill, blocks * decode, throughput, memory, bottleneck, values)
