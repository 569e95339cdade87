"""`compute: int8` (`Policy.compute`): decoder matrices as 8-bit codes, multiplied by 8-bit activations.

CPUs with AVX-512 VNNI or AMX multiply int8 by int8 into int32 several times faster than fp32 by fp32, and torch
exposes it as `torch._int_mm`. Measured on such a CPU (2 threads, torch 2.13, GFLOP/s, fp32 `F.linear`
against `_int_mm` on the same shapes): SmolLM2-135M's fused q/k/v (576 -> 960) at m = 1 row 65 / 33, m = 8
126 / 251, m = 64 328 / 2584, m = 256 401 / 3947, m = 2048 418 / 2197; a 2048 -> 8192 matrix at m = 1 28 / 56,
m = 16 131 / 834, m = 256 371 / 2559. Decode also reads a quarter of fp32's weight bytes (half of fp16's).

Quantization is symmetric: a weight row's codes are round(w / s) with s = max|w| / 127 (one fp32 scale per output
row), and each step quantizes each token's activations the same way, so the product is
(x_q * s_x) @ (w_q * s_w)^T = s_x * s_w * (x_q @ w_q^T), the integer part exact in int32 (K < 133,000). The
activation rounding is what changes results (~1% relative per product); it depends only on the token's own
values, so the batch a token is in, the schedule and the placement do not change them.

Where torch's int8 GEMM has no fast kernel for the CPU (AVX2 without VNNI: measured 0.4 GOPS on an AMD EPYC, a
reference loop, against ~140 GFLOP/s for fp32), `int_mm` computes the same int32 products exactly in the fp32 GEMM
instead (`_int_mm_fp32`): results are identical on every CPU, only the speed differs, and the profiler's int8
rates (which `auto` plans with) are those of whichever runs.

Stored form, one flat uint8 buffer of `policy.int8_nbytes(shape)`: codes int8 (N, K) row-major, padded to 64
bytes, then the N fp32 scales.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from runtime.policy import int8_nbytes

_QMAX = 127.0


@dataclass(frozen=True)
class Int8Weight:
    """W (N, K) = codes * scales[:, None]: views into a stored buffer."""

    codes: torch.Tensor
    """int8 (N, K)."""
    scales: torch.Tensor
    """fp32 (N,)."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) float -> x @ W^T + bias (..., N) in x's dtype, through int8 x int8 -> int32."""
        n, k = self.shape
        x2 = x.reshape(-1, k).float()  # (m, K)
        xq, sx = quantize_rows(x2)  # (m, K) int8, (m, 1) fp32
        # (K, N) as a transposed view of the row-major codes: the layout `_int_mm` runs fastest on here
        acc = int_mm(xq, self.codes.t())  # (m, N) int32, exact
        out = acc.float().mul_(sx).mul_(self.scales)  # (m, N)
        if bias is not None:
            out += bias
        return out.to(x.dtype).reshape(*x.shape[:-1], n)

    def dequantize(self) -> torch.Tensor:
        """W as stored, fp32 (N, K)."""
        return self.codes.float() * self.scales[:, None]


_EXACT_K = 1024
"""K chunk of `_int_mm_fp32`: codes lie in [-127, 127], so any partial sum of 1024 products is an integer below
127^2 * 1024 < 2^24, which fp32 holds exactly whatever the GEMM's order of additions."""


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (m, K) int8 @ b (K, N) int8 -> (m, N) int32, exact: torch's int8 GEMM where it is the faster here."""
    return torch._int_mm(a, b) if _int_mm_is_fast() else _int_mm_fp32(a, b)


def _int_mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`int_mm` through the fp32 GEMM, K in chunks of `_EXACT_K` (each chunk's sums exact), summed in int32."""
    k = a.shape[1]
    acc = None
    for lo in range(0, k, _EXACT_K):
        part = (a[:, lo:lo + _EXACT_K].float() @ b[lo:lo + _EXACT_K].float()).to(torch.int32)  # (m, N)
        acc = part if acc is None else acc.add_(part)
    return acc


@functools.cache
def _int_mm_is_fast() -> bool:
    """Whether `torch._int_mm` beats `_int_mm_fp32` on this CPU, timed once on a (64, 1024) x (1024, 1024) product:
    where either wins it wins ~10x (a reference loop against the fp32 GEMM, or VNNI against it), large enough a
    margin that a busy machine's preemptions (several ms on an OpenMP barrier) do not flip the choice."""
    from runtime.profiler import best_time

    a = torch.randint(-127, 128, (64, 1024), dtype=torch.int8)
    b = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8)

    def best(fn) -> float:  # no warm-up call: the slow loop would cost another ~0.3 s
        return best_time(lambda: fn(a, b), reps=2, warm_up=False)

    try:
        return best(torch._int_mm) < best(_int_mm_fp32)
    except (RuntimeError, NotImplementedError):  # a torch build without the CPU kernel
        return False


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (m, K) float -> codes (m, K) int8 and scales (m, 1) fp32 with x ~ codes * scales, symmetric per row.
    An all-zero row gets a tiny scale and zero codes (no division by zero)."""
    scale = x.abs().amax(1, keepdim=True).float().div_(_QMAX).clamp_min_(torch.finfo(torch.float32).tiny)
    return torch.round(x / scale).to(torch.int8), scale


class Int8Codec:
    """Stores matrices in `Int8Weight`'s form; the `WeightCodec` interface (`runtime.compressed`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def identity(self) -> dict:
        """What the stored bytes depend on besides the checkpoint (the offload folder's key)."""
        return {"compute": "int8"}

    def uses_kernel(self, shape: tuple[int, ...]) -> bool:
        return True

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return int8_nbytes(tuple(shape))

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """A float matrix (N, K) -> its stored form, a flat uint8 CPU buffer of `nbytes(shape)`."""
        n, k = w.shape
        codes, scales = quantize_rows(w.detach().cpu().float())  # (N, K), (N, 1)
        buf = torch.zeros(self.nbytes(w.shape), dtype=torch.uint8)
        buf[:n * k].view(torch.int8).view(n, k).copy_(codes)
        buf[buf.numel() - 4 * n:].view(torch.float32).copy_(scales[:, 0])
        return buf

    def decode(self, buf: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor | None = None,
               scratch: torch.Tensor | None = None) -> Int8Weight:
        """A stored buffer -> an `Int8Weight` of views into it (`out`, `scratch`: unused, the interface's)."""
        n, k = shape
        tail = buf[buf.numel() - 4 * n:]
        if tail.storage_offset() % 4:  # an fp32 view needs 4-byte alignment; staged buffers lie at any offset
            tail = tail.clone()
        return Int8Weight(buf[:n * k].view(torch.int8).view(n, k), tail.view(torch.float32))

    def values(self, buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The fp32 weights a stored buffer holds (the activations' rounding is not in them)."""
        return self.decode(buf, shape).dequantize()
