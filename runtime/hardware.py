"""`HardwareSpec`: what the cost model needs to know about a machine; JSON load/save and its cache path.

Measured once by the profiler (`runtime.profiler`, `flexhelm profile`) and cached as JSON under
`$FLEXHELM_CACHE/hardware/<machine key>.json` (default `~/.cache/flexhelm`), or written by hand (FlexGen's
T4 machine ships as `runtime/machines/t4_flexgen.json`). Units: bytes, bytes/s, FLOP/s, values/s.

On a host without an accelerator the compute device is the CPU: the device tier *is* host RAM, so the
spec puts all RAM in `device_mem`, gives the host tier no capacity and the host <-> device link no cost
(`accelerator=False`); the placement's real choice is then RAM versus disk. Importing this stays torch-free.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from runtime.errors import FlexhelmError

SHIPPED = Path(__file__).parent / "machines"
"""Hand-written hardware specs shipped as package data (`t4_flexgen.json`)."""


class HardwareError(FlexhelmError):
    """A hardware spec is missing, malformed or impossible."""


@dataclass(frozen=True)
class Calibration:
    """Efficiency factors fitted to measured runs (`flexhelm profile --fit`); the identity when unfitted."""

    compute: float = 1.0
    """Measured compute time / modelled (kernels outside GEMMs and attention: norms, softmax, sampling)."""
    io: float = 1.0
    """Measured transfer time / modelled (queueing, page faults, thread hand-offs)."""
    call_overhead_s: float = 0.0
    """Seconds per (layer, micro-batch) forward call that no FLOP or byte explains (Python, dispatch)."""
    memory: float = 1.0
    """Measured peak RSS / modelled RAM (allocator slack, transient copies at load, thread pools)."""
    overlap: float = 1.0
    """How much of the other terms hides under the largest when I/O overlaps compute: 1 is FlexGen's max,
    0 a serial sum (a 2-core CPU host: reader threads and compute share the cores)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise HardwareError(f"calibration.{f.name} must be a finite number >= 0, got {v!r}")
        if self.compute == 0 or self.io == 0 or self.memory == 0:
            raise HardwareError("calibration factors compute, io and memory must be > 0")
        if self.overlap > 1:
            raise HardwareError(f"calibration.overlap must be in [0, 1], got {self.overlap}")


@dataclass(frozen=True)
class HardwareSpec:
    """Memory per tier and the bandwidths and throughputs of FlexGen's cost model (section 4, A.3)."""

    name: str
    """Human-readable machine name (the cache key is `machine_key()`, not this)."""
    accelerator: bool
    """False: the device is the CPU, `device_mem` is host RAM and the host tier and link disappear."""
    device_mem: int
    """Bytes of compute-device memory (a CPU-only host: the RAM the run may use)."""
    host_mem: int
    """Bytes of host RAM beside the device (0 on a CPU-only host: it is the device tier)."""
    disk_mem: int
    """Bytes free for offloaded data on disk."""
    host_to_device: float
    """Bytes/s, host RAM -> device (ignored without an accelerator)."""
    device_to_host: float
    """Bytes/s, device -> host RAM (ignored without an accelerator)."""
    disk_to_host: float
    """Bytes/s of sequential reads from disk past the page cache."""
    host_to_disk: float
    """Bytes/s of sequential writes to disk."""
    matmul: dict[str, list[list[float]]]
    """Compute dtype (`float32`, `float16`, `bfloat16`, `int4` = fused weight-only kernel, `int8` = int8 x int8
    with the activations' quantization, `compute: int8`) -> [[m, FLOP/s], ...]
    measured at m rows (tokens in a step): small m is decode-like, large m prefill-like. Between points the
    rate is interpolated in log m; outside them it is the nearest point's."""
    attention_prefill: float
    """FLOP/s of prefill attention (batched matmuls over the prompt) on the device."""
    attention_decode: float
    """FLOP/s of decode attention (one query over the cache) on the device."""
    cpu_attention: float
    """FLOP/s of decode attention on the CPU, next to an off-device cache (FlexGen section 4.2)."""
    dequantize: float
    """Values/s of group-wise dequantization into the compute dtype (weights and KV cache)."""
    convert: float
    """Bytes/s (of output) converting stored weights into the compute dtype in reused buffers (fp16 -> fp32)."""
    int4_dequantize: float = 0.0
    """Values/s unpacking weights in the fused int4 kernel's form into fp32 blocks (`Int4Weight.blocks`); 0: not
    measured (profiles older than the measurement), `dequantize` stands in."""
    base_mem: int = 0
    """Bytes the runtime process holds before any model (interpreter, torch), counted in RAM."""
    calibration: Calibration = field(default_factory=Calibration)
    """Fitted efficiency factors (`flexhelm profile --fit`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.accelerator, bool):
            raise HardwareError(f"accelerator must be true or false, got {self.accelerator!r}")
        for name in ("device_mem", "host_mem", "disk_mem", "base_mem"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise HardwareError(f"{name} must be a whole number of bytes >= 0, got {v!r}")
        for name in ("host_to_device", "device_to_host", "disk_to_host", "host_to_disk", "attention_prefill",
                     "attention_decode", "cpu_attention", "dequantize", "convert", "int4_dequantize"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == math.inf:
                raise HardwareError(f"{name} must be a finite rate >= 0 (0: unusable), got {v!r}")
        if not isinstance(self.matmul, dict) or not self.matmul:
            raise HardwareError("matmul must map a compute dtype to [[m, FLOP/s], ...] points")
        for dtype, points in self.matmul.items():
            ok = isinstance(points, (list, tuple)) and points and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and p[0] >= 1 and p[1] > 0 for p in points)
            if not ok:
                raise HardwareError(f"matmul[{dtype!r}] must be a non-empty list of [m >= 1, FLOP/s > 0], "
                                    f"got {points!r}")
        object.__setattr__(self, "matmul", {d: sorted([float(m), float(r)] for m, r in p)
                                            for d, p in self.matmul.items()})
        if isinstance(self.calibration, dict):
            object.__setattr__(self, "calibration", _from_dict(Calibration, self.calibration, "calibration"))

    def matmul_rate(self, dtype: str, m: float) -> float:
        """FLOP/s of a GEMM with `m` rows in `dtype`, interpolated in log m between measured points."""
        if dtype not in self.matmul:
            raise HardwareError(f"the hardware spec {self.name!r} has no matmul rate for {dtype}; it has "
                                f"{', '.join(self.matmul)} (re-run `flexhelm profile`)")
        points = self.matmul[dtype]
        if m <= points[0][0]:
            return points[0][1]
        for (m0, r0), (m1, r1) in zip(points, points[1:]):
            if m <= m1:
                t = (math.log(m) - math.log(m0)) / (math.log(m1) - math.log(m0))
                return r0 + t * (r1 - r0)
        return points[-1][1]

    def with_memory(self, device: int | None = None, host: int | None = None, disk: int | None = None) -> HardwareSpec:
        """This machine with user memory limits (None keeps the measured capacity)."""
        return replace(self, device_mem=self.device_mem if device is None else device,
                       host_mem=self.host_mem if host is None else host,
                       disk_mem=self.disk_mem if disk is None else disk)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data) -> HardwareSpec:
        return _from_dict(cls, data, "hardware spec")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)  # a reader never sees a half-written profile
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HardwareSpec:
        """A spec from a JSON file, or the name of a shipped one (`t4_flexgen`)."""
        path = Path(path)
        if not path.is_file() and (SHIPPED / f"{path.name}.json").is_file():
            path = SHIPPED / f"{path.name}.json"
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.json")))
            raise HardwareError(f"hardware spec {path} does not exist; run `flexhelm profile` or name a shipped "
                                f"one ({shipped})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HardwareError(f"{path} is not valid JSON ({e}); delete it and run `flexhelm profile` again") from None
        try:
            return cls.from_json(data)
        except HardwareError as e:
            raise HardwareError(f"{path}: {e}") from None


def _from_dict(cls, data, what: str):
    if not isinstance(data, dict):
        raise HardwareError(f"a {what} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown, missing = set(data) - known, required - set(data)
    if unknown:
        raise HardwareError(f"{what}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if missing:
        raise HardwareError(f"{what}: missing keys {sorted(missing)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise HardwareError(f"{what}: {e}") from None


def cache_root() -> Path:
    """flexhelm's cache folder: `$FLEXHELM_CACHE`, default `~/.cache/flexhelm`."""
    return Path(os.environ.get("FLEXHELM_CACHE") or "~/.cache/flexhelm").expanduser()


def machine_key() -> str:
    """A stable name for this machine: host name plus a hash of what changes the measurements (CPU model,
    core count, RAM size, accelerators)."""
    parts = [platform.machine(), str(os.cpu_count()), _cpu_model(), str(_ram_bytes() // 2**30)]
    parts += _gpu_names()
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", platform.node() or "host")
    return f"{host}-{digest}"


def cached_path() -> Path:
    return cache_root() / "hardware" / f"{machine_key()}.json"


def _cpu_model() -> str:
    """The CPU's model name and instruction-set flags: virtual machines report one generic name ("Intel(R) Xeon(R)
    Processor") for CPUs whose GEMM rates differ 2x (AVX-512 and AMX or not), so the name alone mixed profiles."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags")), "")
    return f"{name or platform.processor()} {' '.join(sorted(set(flags.split())))}".strip()


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _gpu_names() -> list[str]:
    """NVIDIA device names from the driver's proc files (no torch or CUDA initialization needed)."""
    root = Path("/proc/driver/nvidia/gpus")
    names = []
    if root.is_dir():
        for info in sorted(root.glob("*/information")):
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
    return names
