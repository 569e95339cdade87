"""Resident weight storage and per-layer materialization in the compute dtype.

Weights are read from the checkpoint one tensor at a time straight into their final storage
(fused q/k/v are copied into one preallocated tensor), so the model is never held twice. When the
storage dtype differs from the compute dtype (fp16 checkpoint on a CPU), `fetch` converts one layer
into reused buffers: converting into a reused buffer runs at 10-15 GB/s here, into a fresh tensor at
~3 GB/s (page faults).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from runtime.checkpoint import Checkpoint
from runtime.errors import CheckpointError
from runtime.layers import Layer, WeightSpec


class WeightStore:
    """All layers' weights in memory, in `storage_dtype`, on `device`."""

    def __init__(self, ckpt: Checkpoint, layers: list[Layer], device: torch.device,
                 storage_dtype: torch.dtype, compute_dtype: torch.dtype, progress: bool = False) -> None:
        self.device, self.compute_dtype = device, compute_dtype
        shared: dict[tuple[str, ...], torch.Tensor] = {}  # a tied head reuses the embedding's tensor
        self.layers: list[dict[str, torch.Tensor]] = []
        for layer in tqdm(layers, desc="loading weights", unit="layer", disable=not progress, leave=False):
            stored = {}
            for spec in layer.weight_specs():
                if spec.sources not in shared:
                    shared[spec.sources] = _load(ckpt, spec, storage_dtype, device)
                stored[spec.key] = shared[spec.sources]
            self.layers.append(stored)
        self.nbytes = sum(t.nbytes for t in shared.values())
        self._buffers: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    def fetch(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s weights in the compute dtype; valid until the next `fetch`."""
        stored = self.layers[index]
        out = {}
        for key, t in stored.items():
            if t.dtype == self.compute_dtype:
                out[key] = t
                continue
            buf = self._buffers.get((t.shape, key))
            if buf is None:
                buf = self._buffers[(t.shape, key)] = torch.empty(t.shape, dtype=self.compute_dtype, device=self.device)
            out[key] = buf.copy_(t)
        return out


def _load(ckpt: Checkpoint, spec: WeightSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if len(spec.sources) == 1:
        t = ckpt.tensor(spec.sources[0])
        _check_shape(ckpt, spec.sources[0], tuple(t.shape), spec.shape)
        return t.to(device=device, dtype=dtype).contiguous()
    out = torch.empty(spec.shape, dtype=dtype, device=device)
    row = 0
    for name in spec.sources:  # one source tensor in RAM at a time
        t = ckpt.tensor(name)
        _check_shape(ckpt, name, tuple(t.shape[1:]), spec.shape[1:])
        out[row:row + t.shape[0]].copy_(t)
        row += t.shape[0]
    _check_shape(ckpt, "+".join(spec.sources), (row, *spec.shape[1:]), spec.shape)
    return out


def _check_shape(ckpt: Checkpoint, name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor {name!r} in {ckpt.path} has shape {tuple(got)}, config.json implies "
                              f"{tuple(want)}: the weights and config.json do not belong together")
