"""Writing a sharded safetensors checkpoint one tensor at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; a converter that must stay within
one tensor of RAM (`runtime.gguf_import`) writes the header from the tensors' names, dtypes and shapes first,
then streams each tensor's bytes as it is produced. The files are the format's own: an 8-byte little-endian
header length, the JSON header (padded with spaces to a multiple of 8), the data; shards are named and indexed
as `save_pretrained` names them (`model-00001-of-00002.safetensors`, `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its name, dtype and shape (known before its values are)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Entries cut into shards in order, each at most `max_shard_bytes` unless one tensor alone is larger."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                    for i in range(count)]


def write_checkpoint(out: Path, entries: list[Entry], produce: Callable[[Entry], torch.Tensor],
                     max_shard_bytes: int = 2 * 2**30, progress: Callable[[Entry], None] = lambda e: None) -> int:
    """Write `entries` as safetensors shards into the folder `out`, calling `produce(entry)` for each tensor's
    values when its turn comes (one tensor in memory at a time); returns the bytes written."""
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_names(len(shards))
    total = 0
    for name, shard in zip(names, shards):
        total += _write_file(out / name, shard, produce, progress)
    if len(shards) > 1:
        weight_map = {e.name: name for name, shard in zip(names, shards) for e in shard}
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return total


def expected_files(entries: list[Entry], max_shard_bytes: int = 2 * 2**30) -> dict[str, int]:
    """The files `write_checkpoint` writes and the size of each, to verify a finished folder."""
    shards = plan_shards(entries, max_shard_bytes)
    return {name: len(_header(shard)) + 8 + sum(e.nbytes for e in shard)
            for name, shard in zip(shard_names(len(shards)), shards)}


def _header(shard: list[Entry]) -> bytes:
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for e in shard:
        header[e.name] = {"dtype": _DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [at, at + e.nbytes]}
        at += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def _write_file(path: Path, shard: list[Entry], produce, progress) -> int:
    header = _header(shard)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for e in shard:
            t = produce(e)
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise ValueError(f"{e.name}: produced {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
            progress(e)
        return f.tell()
