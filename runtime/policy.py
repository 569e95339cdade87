"""`Policy`: how the engine runs a model (batch shape, placement over tiers, overlap); validated, frozen."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from runtime.errors import PolicyError

PREFETCH_DEPTH = 2
"""Layers whose disk weights (`runtime.weights`) are read ahead of the one computing. One, FlexGen's double
buffering, leaves the disk idle whenever a layer's read ends before the previous layer's compute does (layers
with fewer bytes on disk, the tail of a read on fewer threads): W2 on opt-1.3b, alternated in worker processes,
ran about 20% faster at two than at one (docs/MEASUREMENTS.md). Costs one more layer of staging memory (the cost
model counts `PREFETCH_DEPTH + 1` slots)."""
CAST_BLOCK_BYTES = 8 * 2**20
"""Scratch of `runtime.kernels.CastWeight`: one block of rows converted to the compute dtype (best measured
here with a 32 MiB L3, see runtime/kernels.py)."""
ROW_CHUNK = 2048
"""Rows (tokens) of per-token work computed at once (`runtime.layers.by_rows`). Measured here (SmolLM2-135M, 64
prompts of 256 tokens: prefill steps of 16384 rows, 2 cores, fp32): prefill 18.3 s unchunked, 14.6 at 4096 rows,
13.8 at 2048, 15.0 at 1024, 16.4 at 512; the GEMMs keep their rate at 2048 rows while the (rows, ffn) intermediates
stop round-tripping to RAM. A 4-bit weight on the dense path is dequantized once per chunk (the cost model counts
it)."""


class Tier(str, Enum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


class WeightFormat(str, Enum):
    COMPUTE = "compute"
    """Convert each in-memory weight to the compute dtype once, at load (fastest; fp16 doubles on CPU)."""
    CHECKPOINT = "checkpoint"
    """Keep the checkpoint's dtype in memory; convert one layer at a time into reused compute buffers."""


@dataclass(frozen=True)
class Placement:
    """Fractions of a kind of data on the device and in host RAM; the remainder goes to disk."""

    device: float = 1.0
    host: float = 0.0

    def __post_init__(self) -> None:
        for name in ("device", "host"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise PolicyError(f"placement fraction {name}={v!r} must be a number in [0, 1]")
        if self.device + self.host > 1 + 1e-9:
            raise PolicyError(f"placement fractions device={self.device} + host={self.host} exceed 1")

    @property
    def disk(self) -> float:
        return max(0.0, 1.0 - self.device - self.host)

    def fractions(self) -> dict[Tier, float]:
        return {Tier.DEVICE: self.device, Tier.HOST: self.host, Tier.DISK: self.disk}

    def choose(self, position: float) -> Tier:
        """The tier of an item whose middle lies at `position` in [0, 1] of the cumulative size (FlexGen's
        `get_choice`): device first, then host, then disk, so the byte split follows the fractions."""
        if position < self.device:
            return Tier.DEVICE
        if position < self.device + self.host:
            return Tier.HOST
        return Tier.DISK


def _placement(value) -> Placement:
    if isinstance(value, Placement):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"device", "host", "disk"}
        if unknown:
            raise PolicyError(f"unknown placement keys {sorted(unknown)}; use device, host (disk is the rest)")
        return Placement(value.get("device", 0.0), value.get("host", 0.0))
    raise PolicyError(f"a placement must be an object like {{'device': 0.3, 'host': 0.5}}, got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    """A group-wise quantization scheme."""

    bits: int = 4
    group_size: int = 64
    axis: str = "input"
    """Weights: group along the `input` axis (columns of W (out, in); what the fused int4 kernels need) or
    the `output` axis (FlexGen's choice). The KV cache is always grouped along the head dimension."""
    method: str = "minmax"
    """`minmax` (the group's full range) or `search` (per-group clipping with the least error)."""

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise PolicyError(f"quantization bits must be 2, 3, 4 or 8, got {self.bits!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 8 or gs % 8:
            raise PolicyError(f"quantization group_size must be a multiple of 8 (>= 8), got {gs!r}")
        if self.axis not in ("input", "output"):
            raise PolicyError(f"quantization axis must be 'input' or 'output', got {self.axis!r}")
        if self.method not in ("minmax", "search"):
            raise PolicyError(f"quantization method must be 'minmax' or 'search', got {self.method!r}")

    @classmethod
    def from_json(cls, data) -> QuantConfig | None:
        if data is None or isinstance(data, QuantConfig):
            return data
        if not isinstance(data, dict):
            raise PolicyError(f"a compression config must be an object like {{'bits': 4}}, got {data!r}")
        unknown = set(data) - {"bits", "group_size", "axis", "method"}
        if unknown:
            raise PolicyError(f"unknown compression keys {sorted(unknown)}; known: bits, group_size, axis, method")
        return cls(**data)

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "axis": self.axis, "method": self.method}


INT4_DENSE_ROWS = 128
"""Default `Policy.int4_dense_rows`: where the fp32 GEMM over dequantized rows overtakes the fused int4 kernel on
the CPUs measured here (the planner sets it from the machine's profile, `cost_model.int4_dense_rows`)."""

INT4_KERNEL_GROUPS = (32, 64, 128, 256)
"""Group sizes of torch's fused CPU int4 kernel (`runtime.compressed`)."""

COMPUTES = ("exact", "int8")
"""`Policy.compute` choices: `exact` computes in the compute dtype (fp32 on a CPU) on the weights as stored; `int8`
multiplies 8-bit activations by 8-bit weights (`runtime.int8`), which changes results and so is only ever chosen."""


def int8_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of a matrix (N, K) in `compute: int8`'s stored form (`runtime.int8`): int8 codes (N, K) padded to 64
    bytes, then one fp32 scale per row. Torch-free, so the cost model and the runtime size it alike."""
    n, k = shape
    return -(-n * k // 64) * 64 + 4 * n


def int4_kernel_fits(shape: tuple[int, ...], config: QuantConfig) -> bool:
    """Whether a matrix of `shape` (N, K) under `config` can be stored in the fused CPU int4 kernel's form: 4 bits
    grouped along the input axis by a group the kernel has, N a multiple of 16, K of the group. Torch-free, so the
    cost model (`uses_int4_kernel`) and the runtime (`WeightCodec.uses_kernel`) decide alike."""
    if len(shape) != 2 or config.bits != 4 or config.axis != "input" or config.group_size not in INT4_KERNEL_GROUPS:
        return False
    n, k = shape
    return n % 16 == 0 and k % config.group_size == 0


@dataclass(frozen=True)
class QuantLayout:
    """Sizes of the packed parts of a (rows, cols) tensor; all three live in one flat uint8 buffer."""

    rows: int
    cols: int
    config: QuantConfig

    @property
    def groups(self) -> int:
        return math.ceil(self.cols / self.config.group_size)

    @property
    def padded_cols(self) -> int:
        return self.groups * self.config.group_size

    @property
    def data_bytes(self) -> int:
        return self.rows * self.padded_cols * self.config.bits // 8

    @property
    def meta_bytes(self) -> int:
        return self.rows * self.groups * 2  # one fp16 per group, for each of scale and minimum

    @property
    def nbytes(self) -> int:
        return self.data_bytes + 2 * self.meta_bytes


def layout_of(shape: tuple[int, ...], config: QuantConfig, transpose: bool = False) -> QuantLayout:
    """The layout of a tensor of `shape` viewed as rows x last dim (or its 2-D transpose)."""
    if transpose:
        if len(shape) != 2:
            raise ValueError(f"output-axis grouping needs a matrix, got shape {shape}")
        return QuantLayout(shape[1], shape[0], config)
    return QuantLayout(math.prod(shape[:-1]), shape[-1], config)


@dataclass(frozen=True)
class Policy:
    """Execution policy. A block of `gpu_batch_size * num_gpu_batches` sequences shares each loaded layer."""

    gpu_batch_size: int = 16
    """Sequences per micro-batch (one forward call of a layer)."""
    num_gpu_batches: int = 1
    """Micro-batches per block; each loaded layer is reused by all of them before the next layer."""
    device: str = "auto"
    """Compute device: `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    weight_format: WeightFormat = WeightFormat.COMPUTE
    """In-memory format of weights, see `WeightFormat` (weights on disk keep the checkpoint's dtype)."""
    weights: Placement = field(default_factory=Placement)
    """Where weights live (by bytes, within each layer)."""
    cache: Placement = field(default_factory=Placement)
    """Where the KV cache lives (by (layer, micro-batch) slot)."""
    activations: Placement = field(default_factory=Placement)
    """Where hidden states between layers live (by micro-batch)."""
    overlap: bool = True
    """Prefetch the next layer's weights and the next micro-batch's cache while computing."""
    cpu_attention: bool = True
    """CUDA: decode attention over an off-device cache runs on the CPU, next to the cache."""
    pin_host_memory: bool = True
    """CUDA: host-resident weights and staging buffers in pinned memory (faster, asynchronous copies)."""
    compress_weight: QuantConfig | None = None
    """Group-wise quantization of weight matrices on every tier (None: the checkpoint's precision)."""
    compress_cache: QuantConfig | None = None
    """Group-wise quantization of the KV cache along the head dimension, as it is produced."""
    int4_dense_rows: int = INT4_DENSE_ROWS
    """CPU, weights in the fused int4 kernel's form: a matmul of at least this many rows (tokens in a step: prefill,
    scoring) dequantizes the weight a block of rows at a time into fp32 and runs the fp32 GEMM (exact fp32 compute on
    the stored 4-bit weights); fewer rows (decode) run the int4 kernel (bf16 activations, 1/8 of fp32's bytes)."""
    compute: str = "exact"
    """`exact`, or `int8` (CPU, opt-in: it changes results): every weight matrix (decoder matrices, projections, an
    untied head) is stored as 8-bit codes with a scale per output row, and each step's activations are quantized to
    8 bits per token before an int8 x int8 -> int32 GEMM (`runtime.int8`; the embedding tables and a head tied to
    them stay as stored). Not with `compress_weight`."""

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches", "int4_dense_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PolicyError(f"Policy.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise PolicyError(f"Policy.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        try:
            object.__setattr__(self, "weight_format", WeightFormat(self.weight_format))
        except ValueError:
            raise PolicyError(f"Policy.weight_format must be one of {[f.value for f in WeightFormat]}, "
                              f"got {self.weight_format!r}") from None
        for name in ("weights", "cache", "activations"):
            object.__setattr__(self, name, _placement(getattr(self, name)))
        for name in ("compress_weight", "compress_cache"):
            object.__setattr__(self, name, QuantConfig.from_json(getattr(self, name)))
        if self.compute not in COMPUTES:
            raise PolicyError(f"Policy.compute must be one of {', '.join(COMPUTES)}, got {self.compute!r}")
        if self.compute == "int8" and self.compress_weight is not None:
            raise PolicyError("Policy.compute int8 stores the weights as 8-bit codes itself: it does not combine "
                              "with compress_weight (drop one of them)")
        for name in ("overlap", "cpu_attention", "pin_host_memory"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"Policy.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @classmethod
    def from_percent(cls, wg: float, wc: float, cg: float, cc: float, hg: float, hc: float, **kw) -> Policy:
        """FlexGen's `--percent`: weights, cache and activations on GPU / CPU in percent, the rest on disk."""
        return cls(weights=Placement(wg / 100, wc / 100), cache=Placement(cg / 100, cc / 100),
                   activations=Placement(hg / 100, hc / 100), **kw)

    @classmethod
    def from_json(cls, data: dict) -> Policy:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"unknown policy fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> dict:
        d = asdict(self)
        d["weight_format"] = self.weight_format.value
        for name in ("compress_weight", "compress_cache"):
            cfg = getattr(self, name)
            d[name] = cfg.to_json() if cfg is not None else None
        return d

    def offloads(self) -> bool:
        """Whether anything is placed on disk."""
        return any(p.disk > 0 for p in (self.weights, self.cache, self.activations))
