"""Weights over tiers, and per-layer materialization in the compute dtype on the compute device.

Placement inside each layer follows the cumulative size of its weights (FlexGen's `get_choice`), so a
30/50/20 policy puts about 30/50/20 % of the bytes on device/host/disk, except that the embedding tables
and the head never go to disk (`WeightSpec.in_memory`; FlexGen places them by the rule). In-memory weights are read from
the checkpoint one tensor at a time straight into their final storage (fused q/k/v into one tensor).
Disk weights are read in place from safetensors files, or from prepared files in the offload folder,
by background threads into `PREFETCH_DEPTH + 1` staging slots used in turn (the next two layers with disk
weights load while layer i computes), past the page cache (`DiskIO.read_spans`: a layer's tensors that lie
together in a file are one block-aligned span, each tensor a view inside it; the slots are huge pages,
`disk.aligned_empty`). `fetch` hands a matrix stored in a narrower dtype than the compute one on the CPU to
`linear` as it is (`kernels.CastWeight`: converted block by block, cache-hot); other conversions and device
copies go into reused compute buffers (into a reused buffer 10-15 GB/s here, into a fresh tensor ~3 GB/s:
page faults).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import accumulate

import torch
from tqdm.auto import tqdm

from runtime.checkpoint import Checkpoint
from runtime.compressed import Codec, weight_codec
from runtime.disk import DiskIO, Pending, Region, aligned_empty, span_capacity
from runtime.errors import CheckpointError
from runtime.kernels import CastWeight
from runtime.layers import Layer, WeightSpec
from runtime.offload import OffloadDir
from runtime.policy import CAST_BLOCK_BYTES, PREFETCH_DEPTH, Placement, Tier

_EPS = 1e-6  # float slack when comparing fractions of a layer's bytes (its smallest tensor is ~1e-5)


@dataclass
class _Stored:
    """One weight of `shape`: a tensor in memory, or regions on disk; compressed weights (`packed` bytes)
    are a flat uint8 buffer in the codec's stored form."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    tier: Tier
    tensor: torch.Tensor | None = None
    regions: list[Region] | None = None
    name: str = ""
    packed: int = 0

    @property
    def nbytes(self) -> int:
        return self.packed or torch.Size(self.shape).numel() * self.dtype.itemsize

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (self.packed,) if self.packed else self.shape


def packed_size(spec: WeightSpec, codec: Codec | None) -> int:
    """Bytes of `spec` compressed, or 0 when it stays as is: no codec, not a matrix, or a lookup table
    (embeddings, and a head tied to them, are read by row: they keep the checkpoint's dtype)."""
    if codec is None or len(spec.shape) != 2 or spec.lookup:
        return 0
    return codec.nbytes(spec.shape)


def stored_size(spec: WeightSpec, codec: Codec | None, dtype: torch.dtype) -> int:
    """Bytes of `spec` as stored: packed when compressed, else in `dtype` (its checkpoint tensors')."""
    return packed_size(spec, codec) or torch.Size(spec.shape).numel() * dtype.itemsize


def layer_weights(ckpt: Checkpoint, layers: list[Layer], codec: Codec | None) -> list[tuple[list, list, list]]:
    """Per layer: the weights `WeightStore` places with it (a tied weight once, with its first layer), their
    stored bytes and their checkpoint dtypes; from the checkpoint's headers only."""
    seen, out = set(), []
    for layer in layers:
        specs = [s for s in layer.weight_specs() if s.sources not in seen]
        seen.update(s.sources for s in specs)
        dtypes = [ckpt.dtype_of(s.sources[0]) for s in specs]
        out.append((specs, [stored_size(s, codec, d) for s, d in zip(specs, dtypes)], dtypes))
    return out


def layer_ranks(sizes: list[list[int]]) -> list[float]:
    """Each layer's rank in (0, 1) among the layers of its kind (the same weight sizes): (i * p mod n + 0.5) / n
    for the i-th of n, with p coprime to n near 0.62 n, so that the layers ranked below any share are spread
    along the model rather than bunched at its start (their reads then alternate with bigger ones)."""
    kinds: dict[tuple, list[int]] = {}
    for j, layer_sizes in enumerate(sizes):
        kinds.setdefault(tuple(layer_sizes), []).append(j)
    ranks = [0.5] * len(sizes)
    for members in kinds.values():
        n = len(members)
        p = next(q for q in sorted(range(1, n + 1), key=lambda q: abs(q - 0.618 * n)) if math.gcd(q, n) == 1)
        for i, j in enumerate(members):
            ranks[j] = (i * p % n + 0.5) / n
    return ranks


def assign_tiers(specs: list[WeightSpec], sizes: list[int], placement: Placement, ram: Tier,
                 rank: float = 0.5) -> list[Tier]:
    """Tier of each weight of a layer of `rank` (`layer_ranks`): device below the placement's first cut in the
    layer's cumulative bytes, host below the second, disk above; a weight kept `in_memory` goes to `ram` (the
    memory tier next to the disk) where that says disk.

    Whole tensors move, so a cut falls on a boundary between two tensors: on the upper one in the layers ranked
    below s (where the cut lies between the two, 0 to 1), on the lower one in the others. Of n layers of a kind,
    round(n * s) keep the tensor: over the model each tier holds its fraction of the bytes within a tensor, and
    exactly at `weight_levels`. A layer alone of its kind (embedding, head) has rank 0.5: a tensor goes where
    its middle lies, FlexGen's rule (`get_choice`), which is the same in every layer and so realises other
    fractions than it is given (opt-1.3b: 0.125 as nothing, 0.2 as 0.25)."""
    bounds = _bounds(sizes)
    low = _cut(bounds, placement.device, rank)
    high = _cut(bounds, placement.device + placement.host, rank)
    tiers = []
    for spec, end in zip(specs, bounds[1:]):
        tier = Tier.DEVICE if end <= low + _EPS else Tier.HOST if end <= high + _EPS else Tier.DISK
        tiers.append(ram if spec.in_memory and tier == Tier.DISK else tier)
    return tiers


def _bounds(sizes: list[int]) -> tuple[float, ...]:
    """The boundaries between a layer's tensors in its cumulative bytes, from 0 to 1."""
    return (0.0, *(done / max(1, sum(sizes)) for done in accumulate(sizes)))


def _cut(bounds: tuple[float, ...], cut: float, rank: float) -> float:
    """The boundary of `bounds` (ascending, 0 to 1) that a cut at `cut` falls on in a layer of `rank`: monotone
    in `cut`, so the two cuts of a placement never cross."""
    k = max(i for i, b in enumerate(bounds) if b <= cut + _EPS)
    if k == len(bounds) - 1 or bounds[k] >= cut - _EPS:
        return bounds[k]
    return bounds[k + 1] if rank < (cut - bounds[k]) / (bounds[k + 1] - bounds[k]) else bounds[k]


class WeightStore:
    """All layers' weights, placed by `placement`; `prefetch(i)` / `fetch(i)` bring layer i to compute."""

    def __init__(self, ckpt: Checkpoint, layers: list[Layer], device: torch.device, memory_dtype: torch.dtype,
                 compute_dtype: torch.dtype, placement: Placement, io: DiskIO | None = None,
                 offload: OffloadDir | None = None, pin: bool = False, progress: bool = False,
                 codec: Codec | None = None) -> None:
        self.device, self.compute_dtype, self.io, self.codec = device, compute_dtype, io, codec
        self.pin = pin and device.type == "cuda"
        self.depth = PREFETCH_DEPTH
        self.fetch_s = 0.0
        """Seconds spent in `fetch` so far (staging, converting, dequantizing), for benchmarks and calibration."""
        self.wait_s = 0.0
        """Of `fetch_s`, seconds blocked on reads not done yet (the disk behind the compute)."""
        self.layers: list[dict[str, _Stored]] = []
        self.lookups: list[set[str]] = []  # per layer, the tables fetched in their stored dtype
        shared: dict[tuple[str, ...], _Stored] = {}  # a tied head reuses the embedding's weight
        to_prepare: dict[str, tuple[int, object]] = {}
        ram = Tier.HOST if device.type == "cuda" else Tier.DEVICE  # on a CPU the device tier is RAM
        planned = layer_weights(ckpt, layers, codec)
        ranks = layer_ranks([sizes for _, sizes, _ in planned])
        for layer, (specs, sizes, dtypes), rank in zip(tqdm(layers, desc="loading weights", unit="layer",
                                                            disable=not progress, leave=False), planned, ranks):
            for spec, tier, fdt in zip(specs, assign_tiers(specs, sizes, placement, ram, rank), dtypes):
                shared[spec.sources] = self._place(ckpt, spec, tier, fdt, memory_dtype, to_prepare)
            self.layers.append({s.key: shared[s.sources] for s in layer.weight_specs()})
            self.lookups.append({s.key for s in layer.weight_specs() if s.lookup})
        if to_prepare:  # e.g. pytorch_model.bin: write the disk-placed weights once, then read those files
            if offload is None:
                raise CheckpointError("weights placed on disk need an offload folder")
            identity = {"checkpoint": ckpt.fingerprint()}
            if codec is not None:
                identity.update(codec.identity())
            regions = offload.prepared(identity, to_prepare)
            for stored in shared.values():
                if stored.tier == Tier.DISK and stored.regions is None:
                    stored.regions = [regions[stored.name]]
        self._all = list(shared.values())
        # per layer, its disk weights (key, stored): tiers are fixed from here on
        self._disk = [[(key, s) for key, s in layer.items() if s.tier == Tier.DISK] for layer in self.layers]
        self._disk_layers = [i for i, disk in enumerate(self._disk) if disk]
        self._capacity = max((span_capacity([r for _, s in disk for r in s.regions]) for disk in self._disk),
                             default=0)
        self._staging: dict[int, torch.Tensor] = {}  # slot -> aligned buffer of `_capacity` bytes
        self._compute: dict[tuple, torch.Tensor] = {}
        self._pending: dict[int, tuple[Pending, dict[str, torch.Tensor], int]] = {}  # layer -> reads, buffers, slot
        self._turn = 0

    def _place(self, ckpt: Checkpoint, spec: WeightSpec, tier: Tier, file_dtype: torch.dtype,
               memory_dtype: torch.dtype, to_prepare: dict) -> _Stored:
        on_cpu = self.device.type == "cpu"
        _check_shapes(ckpt, spec)
        packed = packed_size(spec, self.codec)
        if packed:  # quantized once here; on disk, once per checkpoint and config (the offload folder)
            stored = _Stored(spec.shape, torch.uint8, tier, name="+".join(spec.sources), packed=packed)
            encode = lambda: self.codec.encode(_read(ckpt, spec, torch.float32, "cpu"))
            if tier == Tier.DISK:
                to_prepare[stored.name] = (packed, encode)
            elif tier == Tier.DEVICE and not on_cpu:
                stored.tensor = encode().to(self.device)
            else:
                stored.tensor = encode().pin_memory() if self.pin else encode()
            return stored
        if tier == Tier.DISK:
            stored = _Stored(spec.shape, file_dtype, tier, regions=ckpt.regions(spec.sources),
                             name="+".join(spec.sources))
            if stored.regions is None:
                to_prepare[stored.name] = (stored.nbytes, lambda: _read(ckpt, spec, file_dtype, "cpu"))
            return stored
        if tier == Tier.DEVICE and not on_cpu:
            return _Stored(spec.shape, self.compute_dtype, tier, _read(ckpt, spec, self.compute_dtype, self.device))
        dtype = memory_dtype if on_cpu else file_dtype  # host weights on CUDA keep the checkpoint dtype
        t = _read(ckpt, spec, dtype, "cpu")
        return _Stored(spec.shape, dtype, tier, t.pin_memory() if self.pin else t)

    def bytes_by_tier(self) -> dict[str, int]:
        out = {t.value: 0 for t in Tier}
        for s in self._all:
            out[s.tier.value] += s.nbytes
        return out

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._all if s.tier != Tier.DISK)

    def prefetch(self, index: int) -> None:
        """Start reading layer `index`'s disk weights into the next of `depth + 1` staging slots, used in turn.

        Weights never change, so a read that was prefetched and not yet fetched stays valid until its slot is
        taken again; then it is dropped (waited for and forgotten) and a later fetch reads it anew."""
        if self.io is None or index in self._pending or not 0 <= index < len(self.layers):
            return
        disk = self._disk[index]
        if not disk:
            return
        slot = self._turn % (self.depth + 1)
        self._turn += 1
        for other, (pending, _, other_slot) in list(self._pending.items()):
            if other_slot == slot:
                pending.wait()
                del self._pending[other]
        raw = self._staging.get(slot)
        if raw is None:  # one buffer a slot, for the layer whose disk weights span the most
            raw = self._staging[slot] = aligned_empty(self._capacity, self.pin)
        # one call for the whole layer, so that its tensors lying together in a file are one read
        pending, parts = self.io.read_spans([r for _, s in disk for r in s.regions], raw)
        staged, at = {}, 0
        for key, s in disk:
            n = len(s.regions)
            staged[key] = [p.view(s.dtype).view(-1, *s.stored_shape[1:]) for p in parts[at:at + n]]  # one per source
            at += n
        self._pending[index] = (pending, staged, slot)

    def fetch_ahead(self, index: int, stop: int, wrap: bool) -> dict[str, torch.Tensor]:
        """`fetch(index)` after starting the reads of the layers `read_ahead` names: asked for before layer
        `index` is fetched, so the disk does not idle while it converts."""
        for j in self.read_ahead(index, stop, wrap):
            self.prefetch(j)
        return self.fetch(index)

    def read_ahead(self, index: int, stop: int, wrap: bool) -> list[int]:
        """The layers whose reads `fetch_ahead(index, stop, wrap)` starts: the next `depth` layers with disk weights
        below `stop`, and with `wrap` (a pass over every layer) past the last one the next pass's first ones.
        Layers without disk weights are skipped, so the reads run on through the head and the embedding from one
        decode step into the next."""
        ahead = [j for j in self._disk_layers if index < j < stop] + (
            [j for j in self._disk_layers if j < index] if wrap else [])
        return ahead[:self.depth]

    @property
    def in_flight(self) -> list[int]:
        """The layers whose disk reads are started and not fetched yet, in layer order."""
        return sorted(self._pending)

    def fetch(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s weights in the compute dtype on the device (matrices possibly as `CastWeight`s);
        valid until the next `fetch`."""
        started = time.perf_counter()
        self.prefetch(index)
        pending, staged, _ = self._pending.pop(index, (Pending([]), {}, None))
        blocked = time.perf_counter()
        pending.wait()
        self.wait_s += time.perf_counter() - blocked
        try:
            return self._fetched(index, staged)
        finally:
            self.fetch_s += time.perf_counter() - started

    def _fetched(self, index: int, staged: dict) -> dict[str, torch.Tensor]:
        out = {}
        for (key, s), nth in zip(self.layers[index].items(), _nth_of_shape(self.layers[index].values())):
            parts = staged.get(key, [s.tensor])  # a staged weight of several sources comes in parts (rows)
            src = parts[0]
            if s.packed:
                if src.device != self.device:
                    src = self._buffer(self._compute, ((s.packed,), src.dtype, nth), (s.packed,), src.dtype,
                                       self.device).copy_(src, non_blocking=True)
                if self.codec.uses_kernel(s.shape):  # large int4 steps dequantize blocks of rows (Int4Weight.dense)
                    out[key] = self.codec.decode(src, s.shape, scratch=self._cast_scratch(torch.float32))
                else:
                    out[key] = self.codec.decode(src, s.shape, self._buffer(
                        self._compute, (s.shape, self.compute_dtype, nth), s.shape, self.compute_dtype, self.device))
                continue
            dtype = src.dtype if key in self.lookups[index] else self.compute_dtype
            if dtype != src.dtype and len(s.shape) == 2 and self.device.type == "cpu":
                # converted block by block inside `linear` (kernels.CastWeight): no buffer of the weight's size.
                # CUDA keeps the whole-weight copy below: its conversion runs at device bandwidth.
                out[key] = CastWeight(tuple(parts), self._cast_scratch(dtype))
                continue
            # In place only where torch's allocator would have put it: a GEMM over a weight at another alignment
            # differs in the last bits (oneDNN picks its kernels by alignment), which 4-bit KV quantization
            # turns into 1e-4 differences in logits. A staged weight lies at its file offset mod 4096.
            if len(parts) == 1 and src.dtype == dtype and src.device == self.device and src.data_ptr() % 64 == 0:
                out[key] = src
            else:  # buffers are shared by weights of one shape and rank across layers (a tied head too)
                buf = out[key] = self._buffer(self._compute, (s.shape, dtype, nth), s.shape, dtype, self.device)
                row = 0
                for part in parts:  # (rows, ...) each
                    buf[row:row + part.shape[0]].copy_(part)
                    row += part.shape[0]
        return out

    def _cast_scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """The block buffer weights converted inside `linear` share (one `linear` runs at a time)."""
        return self._buffer(self._compute, ("cast", dtype), (CAST_BLOCK_BYTES // dtype.itemsize,), dtype, self.device)

    @staticmethod
    def _buffer(pool: dict, key: tuple, shape, dtype, device, pin: bool = False) -> torch.Tensor:
        buf = pool.get(key)
        if buf is None:
            buf = pool[key] = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
        return buf


def _nth_of_shape(weights) -> list[int]:
    """For each weight, how many earlier weights of its layer have the same stored shape (buffer keys:
    compressed matrices of different shapes can have the same packed size)."""
    seen: dict[tuple, int] = {}
    out = []
    for s in weights:
        out.append(seen.get(s.stored_shape, 0))
        seen[s.stored_shape] = out[-1] + 1
    return out


def _read(ckpt: Checkpoint, spec: WeightSpec, dtype: torch.dtype, device) -> torch.Tensor:
    """A weight built from its checkpoint tensors, one source tensor in RAM at a time."""
    if len(spec.sources) == 1:
        return ckpt.tensor(spec.sources[0]).to(device=device, dtype=dtype).contiguous()
    out = torch.empty(spec.shape, dtype=dtype, device=device)
    row = 0
    for name in spec.sources:
        t = ckpt.tensor(name)
        out[row:row + t.shape[0]].copy_(t)
        row += t.shape[0]
    return out


def _check_shapes(ckpt: Checkpoint, spec: WeightSpec) -> None:
    """The sources concatenate to the spec's shape (checked from headers, before any read)."""
    shapes = [ckpt.shape_of(name) for name in spec.sources]
    got = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
    if any(s[1:] != shapes[0][1:] for s in shapes) or tuple(got) != tuple(spec.shape):
        raise CheckpointError(f"tensor {'+'.join(spec.sources)!r} in {ckpt.path} has shape "
                              f"{' + '.join(str(tuple(s)) for s in shapes)}, config.json implies {spec.shape}: "
                              "the weights and config.json do not belong together")


def weight_levels(spec, compress_weight=None, compute: str = "exact") -> list[float]:
    """The weight fractions the runtime realises exactly, as the cost model reads them (that share of every
    layer's bytes, over the model): with the boundaries b between the tensors of a decoder layer in its
    cumulative bytes and n decoder layers, b_k + (b_k+1 - b_k) * m / n for m in 0..n: m of the n layers
    keep the tensor between b_k and b_k+1 (`assign_tiers`). From `spec`: no checkpoint needed. Layers other
    than the most common kind (embedding, head) are ignored; each layer's tensors are taken as `assign_tiers`
    takes them, kept ones included."""
    from collections import Counter

    from runtime.shapes import layout

    codec = weight_codec(compress_weight, compute, torch.device("cpu"))
    dtype = getattr(torch, spec.torch_dtype)
    kinds: Counter = Counter()
    for layer in layout(spec):
        sizes = [stored_size(s, codec, dtype) for s in layer.weights]
        if sum(sizes):
            kinds[_bounds(sizes)] += 1
    if not kinds:
        return [0.0, 1.0]
    bounds, n = kinds.most_common(1)[0]
    levels = {lo + (hi - lo) * m / n for lo, hi in zip(bounds, bounds[1:]) for m in range(n + 1)}
    return sorted(levels | {0.0, 1.0})
