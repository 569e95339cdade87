"""Compute kernels chosen by shape, so layer code stays plain.

`linear`: on the CPU in fp32, `F.linear` (x @ W^T) runs skinny products poorly: measured here with
torch 2.13 / MKL on a 2048 x 8192 weight, m = 8 rows at ~28 GFLOP/s and m = 32 at ~89, while the same
product computed as (W @ x^T)^T runs at ~47 and ~125 (1.3-2x over m = 4..256, as good at m = 256,
slightly worse at m = 1 and at prefill sizes). Same math, same memory, a different summation blocking
(differences ~1e-7 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.compressed import Int4Weight

# Rows (tokens in a step) for which the transposed product wins on the CPU, measured as above.
_SKINNY_ROWS = range(2, 257)


def linear(x: torch.Tensor, w: torch.Tensor | Int4Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T + b (N) -> (..., N); `w` may be a compressed weight in a fused kernel's form."""
    if isinstance(w, Int4Weight):
        return w.matmul(x, b)
    m = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.dtype != torch.float32 or m not in _SKINNY_ROWS:
        return F.linear(x, w, b)
    x2 = x.reshape(m, x.shape[-1])  # (m, K)
    out = torch.mm(w, x2.t()) if b is None else torch.addmm(b[:, None], w, x2.t())  # (N, m)
    # contiguous rows again: later kernels (SDPA's flash path) need a unit stride on the last dim
    return out.t().contiguous().reshape(*x.shape[:-1], w.shape[0])  # (..., N)
