"""Compressed weights: how a quantized matrix is stored (on every tier) and how it is computed with.

One handler per config (`WeightCodec`) decides per matrix between two stored forms, both one flat
uint8 buffer of the same size (about 0.28x fp16 at 4 bits, group 64):

- `int4-cpu`: the packed form of torch's fused group-wise int4 kernel for the CPU
  (`aten._weight_int4pack_mm_for_cpu`, a private API wrapped here only). Measured ~110-190 GFLOP/s whatever
  m, with bf16 activations, against 30-300 for fp32 at decode sizes, reading 1/8 of the bytes. Converting to
  its tiled packing costs ~10 ns a weight (more than the decode matmul itself), so it is the stored form:
  converted once when the weight is quantized, never per step; its layout is unpacked here (`unpack_int4pack`)
  for steps of many rows, which run in the fp32 GEMM on dequantized blocks (`Int4Weight.dense`).
  Buffer: packed (N, K/2) uint8, then scales and zeros bf16 (K/group, N, 2), zero = value of code 8.
- `grouped`: the portable packed format of `runtime.quant` (any bits, either axis, CUDA), dequantized
  next to compute into a reused buffer of the compute dtype.

The kernel computes with bf16 activations, so its products differ from the dense path's fp32 ones by bf16
rounding (~0.3% relative); which path a step takes depends only on its rows and the policy, and a weight's form
only on its shape and the config, never on its tier, so offloading does not change results.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from runtime.errors import PolicyError
from runtime.int8 import Int8Codec
from runtime.policy import INT4_DENSE_ROWS, QuantConfig, int4_kernel_fits
from runtime.quant import QuantizedTensor, dequantize, layout_of, quantize


@dataclass(frozen=True)
class Int4Weight:
    """A weight W (N, K) in the CPU int4 kernel's form: views into one flat uint8 buffer.

    `linear` (runtime.kernels) multiplies a step of fewer than `dense_rows` rows in the kernel (`matmul`) and a
    larger one in the fp32 GEMM over `blocks()` of rows dequantized into `scratch`: the kernel (~110-190
    GFLOP/s measured, whatever m) runs below the fp32 GEMM at prefill sizes (170-440), and the dequantization
    (~0.6 ns a weight, into a cache-sized block) is paid back from about 100-130 rows."""

    packed: torch.Tensor
    """uint8 (N, K/2), the kernel's tiled packing (`unpack_int4pack`)."""
    scales_zeros: torch.Tensor
    """bf16 (K/group, N, 2): step and value of code 8 per group."""
    group_size: int
    scratch: torch.Tensor | None = None
    """Flat fp32 buffer for dequantized row blocks; None: always the kernel."""
    dense_rows: int = INT4_DENSE_ROWS

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def dense(self, rows: int) -> bool:
        """Whether a product of `rows` rows runs on dequantized blocks (`blocks`) rather than in the kernel."""
        return self.scratch is not None and rows >= self.dense_rows

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) -> x @ W^T + bias in the fused kernel: (..., N) in x's dtype."""
        n, k = self.shape
        x2 = x.reshape(-1, k).to(torch.bfloat16)  # (m, K)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        out = out.to(x.dtype)  # (m, N)
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], n)

    def blocks(self):
        """(first row, those rows of W dequantized into `scratch`, fp32 (r, K)): valid until the next is taken.
        Blocks are whole tiles of the packing (`int4pack_layout`), the last one the tail of N % tile rows."""
        n, k = self.shape
        tile = int4pack_layout()[0]
        tiles = max(1, self.scratch.numel() // (tile * k))
        full = n - n % tile
        for a in range(0, full, tile * tiles):
            r = min(tile * tiles, full - a)
            yield a, self._dequantize(a, r, self.scratch[:r * k].view(r, k))
        if full < n:
            yield full, self._dequantize(full, n - full, self.scratch[:(n - full) * k].view(n - full, k))

    def dequantize(self) -> torch.Tensor:
        """W as the kernel's stored values, fp32 (N, K): what the dense path computes with."""
        n, k = self.shape
        return self._dequantize(0, n, torch.empty(n, k))

    def _dequantize(self, a: int, r: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [a, a + r) of W into `out` (r, K): (code - 8) * step + value of code 8, exact but for one rounding."""
        k, g = out.shape[1], self.group_size
        out.copy_(unpack_int4pack(self.packed[a:a + r], k))  # codes (r, K)
        steps = self.scales_zeros[:, a:a + r].float()  # (K/g, r, 2)
        vals = out.view(r, k // g, g)
        vals.sub_(8).mul_(steps[..., 0].t()[..., None]).add_(steps[..., 1].t()[..., None])
        return out


def unpack_int4pack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The 4-bit codes (r, K) uint8 of rows packed by `aten._convert_weight_to_int4pack_for_cpu` (r, K/2), r a
    whole number of tiles or the last rows of a matrix (the tail after its whole tiles)."""
    tile, split = int4pack_layout()
    return _unpack(packed, k, tile, split)


@functools.cache
def int4pack_layout() -> tuple[int, bool]:
    """(rows per tile, split) of the CPU int4 packing, which depends on the vector width torch was dispatched to:
    tiles of 64 rows under AVX-512 and of 32 under AVX2, each stored (K, tile/2) bytes; `split`: byte j at column
    k holds row j in its low nibble and row tile/2 + j in its high one, else rows 2j and 2j + 1 (as a last tile
    of fewer rows always is). Found by packing a probe and keeping the candidate that unpacks it."""
    probe = torch.randint(0, 16, (208, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2)  # 208 rows: whole tiles and a tail
    for tile in (64, 32):
        for split in (True, False):
            if torch.equal(_unpack(packed, 64, tile, split).int(), probe):
                return tile, split
    raise RuntimeError(f"torch {torch.__version__}'s int4 packing on this CPU is none of the known layouts: "
                       "compress weights with a group size the kernel does not take, or another torch version")


def _unpack(packed: torch.Tensor, k: int, tile: int, split: bool) -> torch.Tensor:
    """`unpack_int4pack` under one candidate layout."""
    r = packed.shape[0]
    full = r - r % tile
    out = torch.empty(r, k, dtype=torch.uint8)
    if full:
        b = packed[:full].reshape(full // tile, k, tile // 2)
        tiles = out[:full].view(full // tile, tile // 2, 2, k) if not split else \
            out[:full].view(full // tile, 2, tile // 2, k).transpose(1, 2)  # (tiles, tile/2, nibble, K)
        tiles[:, :, 0] = (b & 15).transpose(1, 2)
        tiles[:, :, 1] = (b >> 4).transpose(1, 2)
    if full < r:
        b = packed[full:].reshape(k, (r - full) // 2)
        pairs = out[full:].view((r - full) // 2, 2, k)
        pairs[:, 0] = (b & 15).t()
        pairs[:, 1] = (b >> 4).t()
    return out


class WeightCodec:
    """Compresses matrices under one `QuantConfig` and turns stored buffers back into computable weights."""

    def __init__(self, config: QuantConfig, device: torch.device, dense_rows: int = INT4_DENSE_ROWS) -> None:
        self.config, self.device, self.dense_rows = config, device, dense_rows

    def identity(self) -> dict:
        """What the stored bytes depend on besides the checkpoint (the offload folder's key): the config, torch's
        version and, on a CPU, the int4 packing's layout (`int4pack_layout`), as the kernel's packing may change
        with either."""
        ident = {"compress": self.config.to_json(), "torch": torch.__version__}
        if self.device.type == "cpu":  # the packing's tiles follow the CPU's vector width
            ident["int4pack"] = list(int4pack_layout())
        return ident

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

    def decode(self, buf: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor | None = None,
               scratch: torch.Tensor | None = None):
        """A stored buffer -> an `Int4Weight` (views, no copy; `scratch` its fp32 block buffer) or the dequantized
        matrix (into `out`)."""
        if self.uses_kernel(tuple(shape)):
            n, k = shape
            g = self.config.group_size
            packed = buf[:n * k // 2].view(n, k // 2)
            sz = buf[n * k // 2:].view(torch.bfloat16).view(k // g, n, 2)
            return Int4Weight(packed, sz, g, scratch, self.dense_rows)
        transpose = self.config.axis == "output"
        q = QuantizedTensor(buf, tuple(shape), layout_of(tuple(shape), self.config, transpose), transpose)
        dtype = out.dtype if out is not None else torch.float32
        return dequantize(q, dtype, out)

    def values(self, buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The fp32 values a stored buffer holds, as the runtime's exact path computes with them (references)."""
        w = self.decode(buf, shape)
        return w.dequantize() if isinstance(w, Int4Weight) else w


Codec = WeightCodec | Int8Codec
"""What stores a policy's decoder matrices, one interface: `nbytes`, `encode`, `decode`, `values`, `uses_kernel`,
`identity`."""


def weight_codec(compress_weight: QuantConfig | None, compute: str, device: torch.device,
                 dense_rows: int = INT4_DENSE_ROWS) -> Codec | None:
    """The codec that stores a policy's decoder matrices (`compress_weight` or `compute: int8`), or None: as is."""
    if compute == "int8":
        if device.type != "cpu":
            raise PolicyError(f"compute: int8 runs on the CPU (torch's int8 GEMM), not on {device.type}: "
                              "drop it or set device: cpu")
        return Int8Codec(device)
    return WeightCodec(compress_weight, device, dense_rows) if compress_weight else None


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
