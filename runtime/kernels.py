"""Compute kernels chosen by shape and storage, so layer code stays plain.

`linear`: on the CPU in fp32, `F.linear` (x @ W^T) runs skinny products poorly: measured here with
torch 2.13 / MKL on a 2048 x 8192 weight, m = 8 rows at ~28 GFLOP/s and m = 32 at ~89, while the same
product computed as (W @ x^T)^T runs at ~47 and ~125 (1.3-2x over m = 4..256, as good at m = 256,
slightly worse at m = 1 and at prefill sizes). Same math, same memory, a different summation blocking
(differences ~1e-7 relative).

`CastWeight`: a weight kept in a narrower dtype than the compute one is converted a block of rows at a
time, each block multiplied while it is still in the CPU's cache. Measured here (AMD EPYC, 32 MiB L3) on
opt-1.3b's four decoder matrices stored fp16, fp32 compute: at m = 16 rows 16 ms a layer against 28 ms for
converting the whole layer into an fp32 buffer and then multiplying (RAM serves 2 bytes a weight instead
of 2 + 4 + 4), at m = 8 18 against 31, at m = 64 42 against 53, at m = 512 the same (279 against 287);
blocks of 8 MiB were best (1 MiB: 26 ms at m = 16, 16 MiB: 19 ms). A block of rows yields those rows of the
product: the same to the bit in every shape measured but m = 1 with a bias (~1e-6 relative, another kernel).

`Int4Weight` (4-bit weights in the CPU int4 kernel's form) goes through the same blocked loop at
`Policy.int4_dense_rows` rows and more: its blocks of rows are dequantized into the fp32 scratch instead of cast
(runtime.compressed). `Int8Weight` (`compute: int8`) always computes in torch's int8 GEMM (runtime.int8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.compressed import Int4Weight
from runtime.int8 import Int8Weight

# Rows (tokens in a step) for which the transposed product wins on the CPU, measured as above.
_SKINNY_ROWS = range(2, 257)


@dataclass(frozen=True)
class CastWeight:
    """A weight W (N, K) in a narrower dtype than the compute one: row blocks `parts` ((rows, K) each, the
    sources of a fused weight in order), converted into `scratch` (flat, the compute dtype) by `linear`."""

    parts: tuple[torch.Tensor, ...]
    scratch: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    def blocks(self):
        """(first row, the block converted into the scratch): valid until the next block is taken."""
        rows = max(1, self.scratch.numel() // self.parts[0].shape[1])
        start = 0
        for part in self.parts:
            for a in range(0, part.shape[0], rows):
                block = part[a:a + rows]  # (r, K)
                yield start, self.scratch[:block.numel()].view(block.shape).copy_(block)
                start += block.shape[0]


def linear(x: torch.Tensor, w: torch.Tensor | Int4Weight | Int8Weight | CastWeight,
           b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T + b (N) -> (..., N); `w` may be a compressed weight in a fused kernel's form, which
    computes either in its kernel or, at `Int4Weight.dense` sizes, from blocks of rows dequantized like a cast."""
    n, k = w.shape
    m = x.numel() // k
    if isinstance(w, Int8Weight) or isinstance(w, Int4Weight) and not w.dense(m):
        return w.matmul(x, b)
    x2 = x.reshape(m, k)  # (m, K)
    skinny = x.device.type == "cpu" and x.dtype == torch.float32 and m in _SKINNY_ROWS
    if isinstance(w, torch.Tensor):
        return _product(x2, w, b, skinny, out=None).reshape(*x.shape[:-1], n)
    out = x2.new_empty((n, m) if skinny else (m, n))
    for start, block in w.blocks():
        rows = slice(start, start + block.shape[0])
        _product(x2, block, None if b is None else b[rows], skinny, out[rows] if skinny else out[:, rows])
    return (out.t().contiguous() if skinny else out).reshape(*x.shape[:-1], n)


def _product(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, skinny: bool,
             out: torch.Tensor | None) -> torch.Tensor:
    """x2 (m, K) @ w (N, K)^T + b -> (m, N), into `out` ((N, m) rows when skinny, else (m, N) columns)."""
    if not skinny:
        y = F.linear(x2, w, b)  # (m, N)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.mm(w, x2.t()) if b is None else torch.addmm(b[:, None], w, x2.t())  # (N, m)
        # contiguous rows again: later kernels (SDPA's flash path) need a unit stride on the last dim
        return out.t().contiguous()
    return torch.mm(w, x2.t(), out=out) if b is None else torch.addmm(b[:, None], w, x2.t(), out=out)
