"""Local Hugging Face checkpoints: find, validate and read tensors one at a time.

Supported layouts: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`),
`pytorch_model.bin` and its sharded index. safetensors headers are parsed and size-checked up front and
each tensor is read at its offset with a plain read; `.bin` files are opened with
`torch.load(mmap=True)`. Neither brings the whole model into RAM at once. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from runtime.disk import Region
from runtime.errors import CheckpointError
from runtime.families import spec_from_config
from runtime.spec import ModelSpec, read_config  # noqa: F401  (read_config: re-exported)

_SAFE_INDEX, _SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
_BIN_INDEX, _BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")
_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def _safetensors_header(file: Path) -> dict:
    """Parse and size-check a safetensors header: 8-byte length, JSON, then the data it describes."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated ({size} bytes): re-copy or re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file} is truncated or corrupt: its header claims {n} bytes but the "
                                  f"file has {size}; re-copy or re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file} has a corrupt header; re-copy or re-download it") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{file} is truncated or corrupt: {8 + n + end} bytes expected from its "
                              f"header, {size} on disk; re-copy or re-download it")
    for t in header.values():
        t["file"], t["base"] = file, 8 + n
    return header


def _read_safetensor(entry: dict) -> torch.Tensor:
    """Read one tensor with a plain positional read into a fresh tensor: no mmap, so the file's pages
    never count as this process's memory and only the tensor itself is resident."""
    if entry["dtype"] not in _SAFE_DTYPES:
        raise CheckpointError(f"{entry['file']}: tensor dtype {entry['dtype']} is not supported")
    out = torch.empty(entry["shape"], dtype=_SAFE_DTYPES[entry["dtype"]])
    start, end = entry["data_offsets"]
    view = out.reshape(-1).view(torch.uint8).numpy()
    if view.nbytes != end - start:
        raise CheckpointError(f"{entry['file']}: a tensor's size disagrees with its shape; the file is corrupt")
    offset, buf = entry["base"] + start, memoryview(view)
    try:
        fd = os.open(entry["file"], os.O_RDONLY)
        try:
            got = 0
            while got < len(buf):  # a regular file returns less only at its end (or on a signal)
                n = os.preadv(fd, [buf[got:]], offset + got)
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
    except OSError as e:  # EIO: a failing disk or a damaged copy; never go on with a zero-filled tensor
        raise CheckpointError(f"cannot read {entry['file']} at offset {offset} ({view.nbytes} bytes): {e.strerror}; "
                              "the file or its disk is damaged: re-copy or re-download it") from None
    if got != view.nbytes:
        raise CheckpointError(f"{entry['file']} is truncated (read {got} of {view.nbytes} bytes at offset {offset}); "
                              "re-copy or re-download it")
    return out


class Checkpoint:
    """A validated local checkpoint folder; `tensor(name)` reads one tensor, on the CPU."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.config = read_config(self.path)
        self.spec: ModelSpec = spec_from_config(self.config)
        self._handles: dict[Path, dict] = {}  # mmapped .bin state dicts
        self._entries: dict[str, dict] = {}  # safetensors: tensor name -> header entry
        self._weight_map = self._find_weights()  # tensor name -> file

    def _find_weights(self) -> dict[str, Path]:
        p = self.path
        if (p / _SAFE_INDEX).is_file():
            return self._from_index(p / _SAFE_INDEX, safetensors=True)
        if (p / _SAFE_SINGLE).is_file():
            return dict.fromkeys(self._safetensors_names(p / _SAFE_SINGLE), p / _SAFE_SINGLE)
        if (p / _BIN_INDEX).is_file():
            return self._from_index(p / _BIN_INDEX, safetensors=False)
        if (p / _BIN_SINGLE).is_file():
            return dict.fromkeys(self._bin(p / _BIN_SINGLE).keys(), p / _BIN_SINGLE)
        raise CheckpointError(f"no weights in {p}: expected {_SAFE_SINGLE}, {_SAFE_INDEX}, {_BIN_SINGLE} "
                              f"or {_BIN_INDEX} (save with model.save_pretrained(dir))")

    def _from_index(self, index: Path, safetensors: bool) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index} is not a valid shard index (no 'weight_map')") from None
        files = {name: self.path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {index.name} is missing from {self.path}")
            if safetensors:
                self._safetensors_names(f)
        return files

    def _safetensors_names(self, file: Path) -> list[str]:
        header = _safetensors_header(file)
        self._entries.update(header)
        return list(header)

    def _bin(self, file: Path) -> dict:
        if file not in self._handles:
            try:
                self._handles[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises several types for a damaged zip/pickle
                raise CheckpointError(f"cannot read {file}: {e}; re-copy or re-download it") from None
        return self._handles[file]

    def resolve(self, name: str) -> str:
        """The stored name of a tensor: HF checkpoints differ on the `model.` prefix."""
        for candidate in (name, name.removeprefix("model."), "model." + name):
            if candidate in self._weight_map:
                return candidate
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.path}: "
                              "the files are incomplete or belong to another architecture")

    def tensor(self, name: str) -> torch.Tensor:
        stored = self.resolve(name)
        if stored in self._entries:
            return _read_safetensor(self._entries[stored])
        return self._bin(self._weight_map[stored])[stored]

    def _meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        stored = self.resolve(name)
        if stored in self._entries:
            e = self._entries[stored]
            return tuple(e["shape"]), _SAFE_DTYPES.get(e["dtype"], torch.uint8)
        t = self._bin(self._weight_map[stored])[stored]
        return tuple(t.shape), t.dtype

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._meta(name)[0]

    def dtype_of(self, name: str) -> torch.dtype:
        return self._meta(name)[1]

    def regions(self, names: tuple[str, ...]) -> list[Region] | None:
        """Where the tensors' bytes lie in safetensors files, to read in place; None for other layouts."""
        entries = [self._entries.get(self.resolve(n)) for n in names]
        if any(e is None for e in entries) or len({e["dtype"] for e in entries}) > 1:
            return None
        return [Region(e["file"], e["base"] + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0])
                for e in entries]

    def storage_dtype(self) -> torch.dtype:
        """dtype of the stored weights (from the first decoder tensor, not the config's claim)."""
        first = next(iter(sorted(self._weight_map)))
        return self.tensor(first).dtype

    def fingerprint(self) -> dict:
        """Identity of the checkpoint files (names, sizes, mtimes): keys caches derived from them."""
        files = sorted(set(self._weight_map.values()) | {self.path / "config.json"})
        return {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files}

    def close(self) -> None:
        self._handles.clear()


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint folder's tokenizer via `AutoTokenizer`, local files only."""
    path = Path(path).expanduser()
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer in {path}: expected one of {', '.join(_TOKENIZER_FILES)} "
                              "(save it with tokenizer.save_pretrained(dir))")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on the file
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from None
