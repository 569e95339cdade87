"""KV cache slots, one per (decoder layer, micro-batch), on the device, in host RAM or on disk.

Every slot has `attend(q, k, v, ctx)`: append this step's keys/values at `ctx.cache_start` and attend
over everything cached. A step of one row on a slot of B rows is a block's shared prefix: its keys and values
go into every row. Memory slots hold (B, kvH, S_max, D) tensors. Disk slots hold a file laid out
sequence-major, (S_max, B, kvH, D) for keys then values, so appending a step and loading a prefix are
each one contiguous transfer; they load into one of two alternating staging buffers (the next
micro-batch's cache loads while this one computes) and write new rows back in the background.
Host slots on CUDA compute decode attention on the CPU when `cpu_attention` is set: only queries and
outputs cross the bus, not the cache (FlexGen section 4.2).
"""

from __future__ import annotations

import dataclasses

import torch

from runtime.compressed import KVCodec
from runtime.disk import DiskIO, Pending, Region
from runtime.layers import StepContext, attention
from runtime.offload import OffloadDir
from runtime.policy import Placement, Tier


class KVSlot:
    """Keys and values in memory: (B, kvH, S_max, D) on `device`."""

    tier = Tier.DEVICE

    def __init__(self, k: torch.Tensor, v: torch.Tensor, compute_device: torch.device,
                 cpu_attention: bool = False, tier: Tier = Tier.DEVICE, codec: KVCodec | None = None) -> None:
        self.k, self.v = k, v  # (B, kvH, S_max, D) each (codec: (B, kvH, S_max, R) uint8), from the runner's pool
        self.compute_device, self.tier, self.codec = compute_device, tier, codec
        self.cpu_attention = cpu_attention and k.device != compute_device

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """q (b, H, T, D), k/v (b, kvH, T, D) of this step, b = B or 1 (written to every row) -> (b, H, T, D)."""
        end, b = ctx.cache_start + k.shape[2], q.shape[0]
        self.k[:, :, ctx.cache_start:end] = _encode(self.codec, k)
        self.v[:, :, ctx.cache_start:end] = _encode(self.codec, v)
        keys, values = _decode(self.codec, self.k[:b, :, :end], q), _decode(self.codec, self.v[:b, :, :end], q)
        return _attend_at(q, keys, values, ctx, self.compute_device, self.cpu_attention)

    def prefetch(self, start: int) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class DiskKVSlot:
    """Keys and values in a scratch file, (S_max, B, kvH, D) each, staged through a shared `StagingRing`."""

    tier = Tier.DISK

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, path, io: DiskIO,
                 ring: StagingRing, compute_device: torch.device, cpu_attention: bool,
                 codec: KVCodec | None = None) -> None:
        B, kvh, S, D = shape  # codec: D is the record size R, dtype uint8
        self.rows = (S, B, kvh, D)
        self.row_bytes = B * kvh * D * dtype.itemsize
        self.path, self.io, self.ring, self.dtype, self.codec = path, io, ring, dtype, codec
        self.compute_device, self.cpu_attention = compute_device, cpu_attention
        self._loaded: tuple[int, torch.Tensor, Pending] | None = None  # (rows, staging, pending read)
        self._writes: list[Pending] = []  # the last step's writes: a load of the same rows waits for them

    def _region(self, which: int, start: int, end: int) -> Region:
        plane = self.rows[0] * self.row_bytes
        return Region(self.path, which * plane + start * self.row_bytes, (end - start) * self.row_bytes)

    def prefetch(self, start: int) -> None:
        """Start loading the first `start` cached positions into a staging buffer."""
        if self._loaded is not None and self._loaded[0] == start:
            return
        buf = self.ring.acquire((2, *self.rows), self.dtype)  # (2, S, B, kvH, D); waits for its earlier writes
        for w in self._writes:  # a shared prefix's rows, written by the step just before this one
            w.wait()
        reads = [self.io.read([self._region(i, 0, start)], buf[i, :start]) for i in (0, 1)] if start else []
        self._loaded = (start, buf, Pending([f for r in reads for f in r.futures]))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        start, end = ctx.cache_start, ctx.cache_start + k.shape[2]
        self.prefetch(start)
        _, buf, pending = self._loaded
        self._loaded = None
        pending.wait()
        buf[0, start:end] = _encode(self.codec, k).permute(2, 0, 1, 3)  # (T, B, kvH, D)
        buf[1, start:end] = _encode(self.codec, v).permute(2, 0, 1, 3)
        self._writes = [self.io.write(self._region(i, start, end), buf[i, start:end]) for i in (0, 1)]
        self.ring.release(buf, self._writes)
        b = q.shape[0]  # 1: a shared prefix, broadcast into every row above
        keys = _decode(self.codec, buf[0, :end, :b].permute(1, 2, 0, 3), q)  # (b, kvH, end, D)
        values = _decode(self.codec, buf[1, :end, :b].permute(1, 2, 0, 3), q)
        return _attend_at(q, keys, values, ctx, self.compute_device, self.cpu_attention)

    @property
    def nbytes(self) -> int:
        return 2 * self.rows[0] * self.row_bytes

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


class PrefixSlot:
    """A scoring block's shared prefix (scoring keeps no other cache): its keys and values once, (1, kvH, P, D),
    taken by the prefix's own step (`cache_start` 0) and attended by every row's tokens before their own."""

    tier = Tier.DEVICE

    def __init__(self) -> None:
        self.k = self.v = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The prefix: q (1, H, P, D), k/v (1, kvH, P, D). The rows: q (b, H, T, D), k/v (b, kvH, T, D), attending
        to (b, kvH, P + T, D) under `ctx.attn_mask` (1, 1, T, P + T)."""
        if ctx.cache_start == 0:
            self.k, self.v = k, v
            return attention(q, k, v, ctx)
        b = q.shape[0]
        keys = torch.cat([self.k.expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([self.v.expand(b, -1, -1, -1), v], dim=2)
        return attention(q, keys, values, ctx)

    def prefetch(self, start: int) -> None:
        pass

    def close(self) -> None:
        self.k = self.v = None

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class StagingRing:
    """Two host buffers per shape, used in turn; a buffer is reused only after its pending writes finish."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._bufs: dict[tuple, list] = {}
        self._writes: dict[int, list[Pending]] = {}

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        ring = self._bufs.setdefault(key, [[], 0])
        if len(ring[0]) < 2:
            ring[0].append(torch.empty(shape, dtype=dtype, pin_memory=self.pin))
        buf = ring[0][ring[1] % len(ring[0])]
        ring[1] += 1
        for w in self._writes.pop(id(buf), []):
            w.wait()
        return buf

    def release(self, buf: torch.Tensor, writes: list[Pending]) -> None:
        self._writes.setdefault(id(buf), []).extend(writes)

    def drain(self) -> None:
        for writes in self._writes.values():
            for w in writes:
                w.wait()
        self._writes.clear()


def _encode(codec: KVCodec | None, x: torch.Tensor) -> torch.Tensor:
    return x if codec is None else codec.encode(x)


def _decode(codec: KVCodec | None, records: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Cached values for attention; compressed records dequantize where they live (fp32 on the CPU)."""
    if codec is None:
        return records
    return codec.decode(records, q.dtype if records.device == q.device else torch.float32)


def _attend_at(q, k, v, ctx: StepContext, compute_device: torch.device, cpu_attention: bool) -> torch.Tensor:
    if k.device == q.device:
        return attention(q, k, v, ctx)
    if cpu_attention:  # compute where the cache is (fp32 on the CPU: fp16 matmuls crawl there)
        mask = None if ctx.attn_mask is None else ctx.attn_mask.cpu()
        cpu_ctx = dataclasses.replace(ctx, attn_mask=mask, dtype=torch.float32)
        out = attention(q.float().cpu(), k.float(), v.float(), cpu_ctx)
        return out.to(q.device, q.dtype)
    return attention(q, k.to(q.device, non_blocking=True), v.to(q.device, non_blocking=True), ctx)


def make_caches(batches: list[int], layers: list, spec, max_len: int, placement: Placement,
                dtype: torch.dtype, device: torch.device, io: DiskIO | None, offload: OffloadDir | None,
                ring: StagingRing | None, cpu_attention: bool, alloc,
                codec: KVCodec | None = None) -> list[dict[int, object]]:
    """One slot per (layer with a cache, micro-batch), placed by (layer, micro-batch) order over the tiers."""
    cached = [i for i, layer in enumerate(layers) if layer.has_cache]
    total = len(cached) * len(batches)
    caches: list[dict[int, object]] = [{} for _ in batches]
    if codec is not None:  # slots hold R-byte records in place of D values
        dtype = torch.uint8
    width = codec.record_bytes if codec is not None else spec.head_dim
    for n, (i, k) in enumerate((i, k) for i in cached for k in range(len(batches))):
        shape = (batches[k], spec.num_kv_heads, max_len, width)
        tier = placement.choose((n + 0.5) / total)
        if tier == Tier.DISK:
            nbytes = 2 * torch.Size(shape).numel() * dtype.itemsize
            path = offload.scratch_file("kv", nbytes)
            caches[k][i] = DiskKVSlot(shape, dtype, path, io, ring, device, cpu_attention, codec)
        else:
            where = device if tier == Tier.DEVICE else torch.device("cpu")
            caches[k][i] = KVSlot(alloc(shape, dtype, where), alloc(shape, dtype, where), device, cpu_attention,
                                  tier, codec)
    return caches
