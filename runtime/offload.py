"""The offload folder: scratch files for KV cache and activations, and prepared weight files.

Prepared weights (for checkpoints that cannot be read in place, such as `pytorch_model.bin`) are
written once per checkpoint identity and storage format, into a temporary folder renamed when
complete, with a manifest of sizes and sampled CRC32s. A folder whose files do not match their manifest
is rebuilt, never used. Safetensors checkpoints need no preparation: their tensors are read in place.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from runtime.disk import OffloadError, Region, byte_view

_SAMPLES, _SAMPLE_BYTES = 16, 64 * 1024


def default_offload_dir() -> Path:
    return Path(os.environ.get("FLEXHELM_CACHE", "~/.cache/flexhelm")).expanduser() / "offload"


def sampled_crc(path: Path, size: int) -> int:
    """CRC32 of 16 evenly spaced 64 KiB samples: catches truncation, torn and zero-filled writes without
    reading a 100 GB file in full on every start."""
    crc = 0
    with open(path, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(size * i // _SAMPLES)
            crc = zlib.crc32(f.read(_SAMPLE_BYTES), crc)
    return crc


class OffloadDir:
    """A writable offload root with a private scratch folder, removed by `close()`."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_offload_dir()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.scratch = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=self.root))
            self._numbers = itertools.count()
        except OSError as e:
            raise OffloadError(f"offload folder {self.root} cannot be used ({e.strerror}); pass --offload-dir "
                               "a writable folder on a disk with room for the offloaded data") from None

    def scratch_file(self, kind: str, nbytes: int) -> Path:
        """A new file of `nbytes` in the scratch folder (sparse until written), named `<kind>-<n>.bin`."""
        path = self.scratch / f"{kind}-{next(self._numbers)}.bin"
        try:
            with open(path, "wb") as f:
                f.truncate(nbytes)
        except OSError as e:
            raise OffloadError(f"cannot create {path} ({e.strerror}); free space or choose another "
                               "--offload-dir") from None
        return path

    def scratch_bytes(self) -> int:
        """Bytes the scratch files occupy on disk now: allocated blocks, so a sparse cache file counts only
        what has been written into it (what `df` would show), not its nominal size."""
        total = 0
        for path in self.scratch.iterdir():
            try:
                total += path.stat().st_blocks * 512
            except FileNotFoundError:  # removed meanwhile (a closing slot)
                pass
        return total

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def prepared(self, identity: dict, items: dict[str, tuple[int, Callable[[], torch.Tensor]]]) -> dict[str, Region]:
        """Regions of the prepared files for `items` (name -> (nbytes, producer)); built if absent or damaged."""
        key = hashlib.sha256(json.dumps([identity, sorted((k, v[0]) for k, v in items.items())],
                                        sort_keys=True).encode()).hexdigest()[:20]
        folder = self.root / "weights" / key
        regions = self._valid(folder, items)
        if regions is None:
            shutil.rmtree(folder, ignore_errors=True)
            self._build(folder, items)
            regions = self._valid(folder, items)
            if regions is None:
                raise OffloadError(f"prepared weights in {folder} failed verification right after writing; "
                                   "the disk may be failing")
        return regions

    @staticmethod
    def _valid(folder: Path, items: dict) -> dict[str, Region] | None:
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            regions = {}
            for name, (nbytes, _) in items.items():
                entry = manifest[name]
                path = folder / entry["file"]
                if entry["nbytes"] != nbytes or path.stat().st_size != nbytes or \
                        sampled_crc(path, nbytes) != entry["crc"]:
                    return None
                regions[name] = Region(path, 0, nbytes)
            return regions
        except (OSError, KeyError, ValueError, TypeError):
            return None

    @staticmethod
    def _build(folder: Path, items: dict) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        try:
            manifest = {}
            for i, (name, (nbytes, produce)) in enumerate(items.items()):
                t = produce().contiguous()
                file = tmp / f"{i:06d}.bin"
                with open(file, "wb") as f:
                    f.write(byte_view(t))
                manifest[name] = {"file": file.name, "nbytes": nbytes, "crc": sampled_crc(file, nbytes)}
            (tmp / "manifest.json").write_text(json.dumps(manifest))
            os.replace(tmp, folder)  # complete or absent: a crash leaves only a .tmp folder, never trusted
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            hint = "the disk is full; free space or" if e.errno == errno.ENOSPC else "check permissions or"
            raise OffloadError(f"cannot write prepared weights under {folder.parent} ({e.strerror}); {hint} "
                               "choose another --offload-dir") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
