"""Compressed weights: how a quantized matrix is stored (on every tier) and how it is computed with.

One handler per config (`WeightCodec`) decides per matrix between two stored forms, both one flat
uint8 buffer of the same size (about 0.28x fp16 at 4 bits, group 64):

- `int4-cpu`: the packed form of torch's fused group-wise int4 kernel for the CPU
  (`aten._weight_int4pack_mm_for_cpu`, a private API wrapped here only). Measured here ~110 GFLOP/s at
  m = 8..256 with bf16 activations, against 31-56 for fp32 at decode sizes, reading 1/8 of the bytes.
  Its packing is tiled and opaque, and converting to it costs ~10 ns a weight (more than the decode
  matmul itself), so it is the stored form: converted once when the weight is quantized, never per step.
  Buffer: packed (N, K/2) uint8, then scales and zeros bf16 (K/group, N, 2), zero = value of code 8.
- `grouped`: the portable packed format of `runtime.quant` (any bits, either axis, CUDA), dequantized
  next to compute into a reused buffer of the compute dtype.

The kernel computes in bf16, so its products differ from dequantize-then-fp32 by bf16 rounding
(~0.3% relative); a weight's form depends only on its shape and the config, never on its tier, so
offloading does not change results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.policy import QuantConfig, int4_kernel_fits
from runtime.quant import QuantizedTensor, dequantize, layout_of, quantize


@dataclass(frozen=True)
class Int4Weight:
    """A weight W (N, K) in the CPU int4 kernel's form: views into one flat uint8 buffer."""

    packed: torch.Tensor
    """uint8 (N, K/2), the kernel's tiled packing."""
    scales_zeros: torch.Tensor
    """bf16 (K/group, N, 2): step and value of code 8 per group."""
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) -> x @ W^T + bias: (..., N) in x's dtype."""
        n, k = self.shape
        x2 = x.reshape(-1, k).to(torch.bfloat16)  # (m, K)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        out = out.to(x.dtype)  # (m, N)
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], n)


class WeightCodec:
    """Compresses matrices under one `QuantConfig` and turns stored buffers back into computable weights."""

    def __init__(self, config: QuantConfig, device: torch.device) -> None:
        self.config, self.device = config, device

    def uses_kernel(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of `shape` is stored in the fused CPU kernel's form."""
        return self.device.type == "cpu" and int4_kernel_fits(tuple(shape), self.config)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return layout_of(tuple(shape), self.config, self.config.axis == "output").nbytes

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """A float matrix (N, K) -> its stored form, a flat uint8 CPU buffer of `nbytes(shape)`."""
        q = quantize(w.cpu(), self.config, transpose=self.config.axis == "output")
        if not self.uses_kernel(tuple(w.shape)):
            return q.buffer
        n, k = w.shape
        g = self.config.group_size
        buf = torch.empty(q.nbytes, dtype=torch.uint8)
        codes = q.codes()[:, :k].to(torch.int32).contiguous()  # (N, K)
        buf[:n * k // 2].view(n, k // 2).copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
        scale, minimum = q.scale.float(), q.minimum.float()  # (N, K/g)
        sz = torch.stack([scale.t(), (minimum + 8 * scale).t()], -1)  # (K/g, N, 2)
        buf[n * k // 2:].view(torch.bfloat16).view(k // g, n, 2).copy_(sz)
        return buf

    def decode(self, buf: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor | None = None):
        """A stored buffer -> an `Int4Weight` (views, no copy) or the dequantized matrix (into `out`)."""
        if self.uses_kernel(tuple(shape)):
            n, k = shape
            g = self.config.group_size
            packed = buf[:n * k // 2].view(n, k // 2)
            return Int4Weight(packed, buf[n * k // 2:].view(torch.bfloat16).view(k // g, n, 2), g)
        transpose = self.config.axis == "output"
        q = QuantizedTensor(buf, tuple(shape), layout_of(tuple(shape), self.config, transpose), transpose)
        dtype = out.dtype if out is not None else torch.float32
        return dequantize(q, dtype, out)



class KVCodec:
    """The KV cache quantized as it is produced: each (sequence, head, position) row of D values becomes
    a record of R bytes, codes then fp16 scales then fp16 minimums, grouped along the head dimension.

    Slots on every tier store records (B, kvH, S, R) uint8 in place of (B, kvH, S, D) floats, so the disk
    and host layouts need no special case; attention dequantizes the cached prefix next to compute."""

    def __init__(self, config: QuantConfig, head_dim: int) -> None:
        self.config, self.head_dim = config, head_dim
        self.layout = layout_of((1, head_dim), config)
        self.record_bytes = self.layout.nbytes  # R

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, kvH, T, D) float -> records (B, kvH, T, R) uint8."""
        q = quantize(x.reshape(-1, self.head_dim), self.config)  # rows = B * kvH * T
        rows, lay = q.layout.rows, q.layout
        parts = [q.data, q.scale.view(torch.uint8), q.minimum.view(torch.uint8)]  # (rows, *) each
        return torch.cat([p.reshape(rows, -1) for p in parts], 1).view(*x.shape[:-1], lay.nbytes // rows)

    def decode(self, records: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """records (B, kvH, S, R) uint8 (any strides) -> values (B, kvH, S, D) in `dtype`."""
        lead = records.shape[:-1]
        rows = records.reshape(-1, self.record_bytes)  # (rows, R)
        one = self.layout
        data_w, meta_w = one.data_bytes, one.meta_bytes
        n = rows.shape[0]
        buf = torch.cat([rows[:, :data_w].reshape(-1), rows[:, data_w:data_w + meta_w].reshape(-1),
                         rows[:, data_w + meta_w:].reshape(-1)])  # back to the packed layout of n rows
        q = QuantizedTensor(buf, (n, self.head_dim), layout_of((n, self.head_dim), self.config))
        return dequantize(q, dtype).view(*lead, self.head_dim)
