"""The hardware profiler (`flexhelm profile`): measures a `HardwareSpec` in well under a minute.

Each figure is measured through the code path the runtime itself uses, so the cost model divides by
what the engine can reach: GEMMs through `runtime.kernels.linear` (on the CPU it multiplies skinny
products transposed), the int4 kernel through `WeightCodec`, int8 x int8 through `runtime.int8` (activations'
quantization included), disk reads and writes through `DiskIO`
(thread pool, page cache dropped after each read) with the test file's pages evicted first
(`posix_fadvise(DONTNEED)` after an fsync: a profile must never measure RAM while claiming disk), dtype
conversion into a reused buffer, dequantization through `runtime.quant`. Timings are the best of a few
repetitions after a warm-up (the least disturbed by other work on a shared machine).

On a CPU-only host the device is the CPU: `device_mem` is the RAM, the host tier and the host <-> device
link disappear. On CUDA the device is the GPU and the links are measured with pinned buffers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.device import native_bf16, read_status
from runtime.hardware import HardwareSpec, machine_key

_GEMM_K, _GEMM_N = 2048, 8192  # opt-1.3b's fc1: weights of 64 MiB in fp32, well beyond the caches
_GEMM_ROWS = (1, 8, 32, 128, 512, 2048)
_INT4_ROWS = (1, 8, 64, 128, 512)
_DISK_BYTES = 256 * 2**20


def best_time(fn: Callable[[], object], reps: int = 3, warm_up: bool = True) -> float:
    """Seconds of the fastest of `reps` calls (after one untimed call): the least disturbed one."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rate(m: int, dtype: torch.dtype, device: torch.device, k: int = _GEMM_K, n: int = _GEMM_N) -> float:
    """FLOP/s of (m, k) @ (n, k)^T in `dtype` through the engine's `linear`."""
    from runtime.kernels import linear

    x, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
    with torch.inference_mode():
        return 2 * m * k * n / best_time(_synced(lambda: linear(x, w), device))


def int4_rate(m: int, k: int = _GEMM_K, n: int = _GEMM_N) -> float | None:
    """FLOP/s of the fused CPU int4 kernel (group 64) through `WeightCodec`; None where torch lacks it."""
    from runtime.compressed import WeightCodec
    from runtime.policy import QuantConfig

    return _codec_rate(WeightCodec(QuantConfig(bits=4, group_size=64), torch.device("cpu")), m, k, n)


def int8_rate(m: int, k: int = _GEMM_K, n: int = _GEMM_N) -> float | None:
    """FLOP/s of `compute: int8`'s product (`Int8Weight.matmul`: the activations quantized, int8 GEMM, scaled);
    None where torch has no int8 GEMM for the CPU."""
    from runtime.int8 import Int8Codec

    return _codec_rate(Int8Codec(torch.device("cpu")), m, k, n)


def _codec_rate(codec, m: int, k: int, n: int) -> float | None:
    """FLOP/s of m rows times a random (n, k) weight in `codec`'s kernel form; None where torch lacks the kernel."""
    try:
        w = codec.decode(codec.encode(torch.randn(n, k)), (n, k))
        x = torch.randn(m, k)
        with torch.inference_mode():
            return 2 * m * k * n / best_time(lambda: w.matmul(x))
    except (RuntimeError, NotImplementedError):
        return None


def int8_rates() -> list[list[float]]:
    """`HardwareSpec.matmul["int8"]`: [[m, FLOP/s], ...] at the fp32 GEMM's rows; [] without the kernel."""
    return [[m, r] for m in _GEMM_ROWS if (r := int8_rate(m)) is not None]


def attention_rate(batch: int, heads: int, q_len: int, kv_len: int, device: torch.device,
                   dtype: torch.dtype) -> float:
    """FLOP/s of SDPA over (batch, heads, q_len, 64) queries and kv_len keys (causal pairs when q_len > 1)."""
    d = 64
    q = torch.randn(batch, heads, q_len, d, dtype=dtype, device=device)
    k, v = (torch.randn(batch, heads, kv_len, d, dtype=dtype, device=device) for _ in range(2))
    causal = q_len > 1
    pairs = q_len * (q_len + 1) / 2 if causal else q_len * kv_len
    with torch.inference_mode():
        seconds = best_time(_synced(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), device))
    return 4 * batch * heads * pairs * d / seconds


def dequantize_rate(rows: int = 4096, cols: int = 4096) -> float:
    """Values/s of group-wise 4-bit dequantization into a reused fp32 buffer."""
    from runtime.policy import QuantConfig
    from runtime.quant import dequantize, quantize

    q = quantize(torch.randn(rows, cols), QuantConfig(bits=4, group_size=64))
    out = torch.empty(rows, cols)
    return rows * cols / best_time(lambda: dequantize(q, torch.float32, out))


def int4_dequantize_rate(rows: int = 4096, cols: int = 2048) -> float | None:
    """Values/s of unpacking a weight in the int4 kernel's form into fp32 row blocks (`Int4Weight.blocks`, what
    a step of `Policy.int4_dense_rows` rows or more does); None where torch lacks the kernel."""
    from runtime.compressed import WeightCodec
    from runtime.policy import CAST_BLOCK_BYTES, QuantConfig

    codec = WeightCodec(QuantConfig(bits=4, group_size=64), torch.device("cpu"))
    try:
        scratch = torch.empty(CAST_BLOCK_BYTES // 4)
        w = codec.decode(codec.encode(torch.randn(rows, cols)), (rows, cols), scratch=scratch)
    except (RuntimeError, NotImplementedError):
        return None
    return rows * cols / best_time(lambda: sum(1 for _ in w.blocks()))


def convert_rate(nbytes: int = 64 * 2**20) -> float:
    """Bytes/s (of fp32 output) of converting fp16 weights into a reused fp32 buffer (what `fetch` does)."""
    src = torch.randn(nbytes // 4).half()
    out = torch.empty(nbytes // 4)
    return nbytes / best_time(lambda: out.copy_(src))


def disk_rates(folder: Path, nbytes: int = _DISK_BYTES) -> tuple[float, float]:
    """(read, write) bytes/s of `DiskIO` on a scratch file in `folder`; the write counts its fsync and the
    read starts with the file's pages evicted."""
    from runtime.disk import DiskIO, Region, aligned_empty

    folder.mkdir(parents=True, exist_ok=True)
    buf = aligned_empty(nbytes).fill_(1)  # aligned: reads bypass the page cache with O_DIRECT, as the weights' do
    io = DiskIO()
    with tempfile.NamedTemporaryFile(dir=folder, prefix="profile-", suffix=".bin") as f:
        path = Path(f.name)
        region = Region(path, 0, nbytes)

        def write() -> None:
            io.write(region, buf).wait()
            os.fsync(f.fileno())

        def read() -> None:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # written back: now evictable
            io.read([region], buf).wait()

        try:
            write_s = best_time(write, reps=2, warm_up=False)
            read_s = best_time(read, reps=2, warm_up=False)
        finally:
            io.close()
    return nbytes / read_s, nbytes / write_s


def profile(offload_dir: str | os.PathLike | None = None, log: Callable[[str], None] = lambda s: None) -> HardwareSpec:
    """Measure this machine (about 20-40 s on a 2-core CPU)."""
    from runtime.offload import default_offload_dir

    folder = Path(offload_dir).expanduser() if offload_dir else default_offload_dir()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    base_mem = read_status("VmRSS") or 0  # the interpreter with torch loaded: every run pays it
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    what = "CUDA " + torch.cuda.get_device_name() if cuda else "the CPU"
    log(f"measuring {what} ({torch.get_num_threads()} threads)")
    matmul = {}
    # bf16 only where the GPU has it natively: the runtime computes fp16 elsewhere (runtime.device.compute_dtype)
    dtypes = ([torch.float16, torch.bfloat16] if native_bf16() else [torch.float16]) if cuda else [torch.float32]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        matmul[name] = [[m, gemm_rate(m, dtype, device)] for m in _GEMM_ROWS]
        log(f"  {name} GEMM GFLOP/s by rows: " + ", ".join(f"{m}: {r / 1e9:.0f}" for m, r in matmul[name]))
    unpack = 0.0  # values/s of the int4 kernel's form into fp32 blocks, where the CPU has that kernel
    if not cuda:
        int4 = [[m, r] for m in _INT4_ROWS if (r := int4_rate(m)) is not None]
        if int4:
            matmul["int4"] = int4
            unpack = int4_dequantize_rate() or 0.0
            log("  int4 kernel GFLOP/s by rows: " + ", ".join(f"{m}: {r / 1e9:.0f}" for m, r in int4)
                + f"; its form into fp32 {unpack / 1e9:.2f} G values/s")
        if int8 := int8_rates():
            matmul["int8"] = int8
            log("  int8 GEMM GFLOP/s by rows: " + ", ".join(f"{m}: {r / 1e9:.0f}" for m, r in int8))
    cdt = torch.float16 if cuda else torch.float32
    attn_p = attention_rate(2, 16, 256, 256, device, cdt)
    attn_g = attention_rate(16, 16, 1, 512, device, cdt)
    cpu_attn = attention_rate(16, 16, 1, 512, torch.device("cpu"), torch.float32) if cuda else attn_g
    dequant, convert = dequantize_rate(), convert_rate()
    log(f"  attention GFLOP/s prefill {attn_p / 1e9:.0f}, decode {attn_g / 1e9:.1f}, CPU {cpu_attn / 1e9:.1f}; "
        f"dequantize {dequant / 1e9:.2f} G values/s; fp16 -> fp32 {convert / 1e9:.1f} GB/s")
    disk_read, disk_write = disk_rates(folder)
    log(f"  disk ({folder}): read {disk_read / 1e9:.2f} GB/s, write {disk_write / 1e9:.2f} GB/s")
    h2d = d2h = 0.0
    if cuda:
        h2d, d2h = _link_rates(device)
        log(f"  host -> device {h2d / 1e9:.1f} GB/s, device -> host {d2h / 1e9:.1f} GB/s")
    disk_free = shutil.disk_usage(folder).free
    return HardwareSpec(
        name=f"{machine_key()} ({torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__})",
        accelerator=cuda, device_mem=torch.cuda.get_device_properties(device).total_memory if cuda else ram,
        host_mem=ram if cuda else 0, disk_mem=disk_free, host_to_device=h2d, device_to_host=d2h,
        disk_to_host=disk_read, host_to_disk=disk_write, matmul=matmul, attention_prefill=attn_p,
        attention_decode=attn_g, cpu_attention=cpu_attn, dequantize=dequant, convert=convert, base_mem=base_mem,
        int4_dequantize=unpack)


def _link_rates(device: torch.device, nbytes: int = 256 * 2**20) -> tuple[float, float]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / best_time(_synced(lambda: dev.copy_(host, non_blocking=True), device))
    d2h = nbytes / best_time(_synced(lambda: host.copy_(dev, non_blocking=True), device))
    return h2d, d2h


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))
