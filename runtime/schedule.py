"""The block schedule: each layer is loaded once and run over every micro-batch of the block.

This is the order of FlexGen's Algorithm 1 (layer-major over a block of micro-batches) without the
overlap of I/O and compute, which the offloading tiers add around the same loop; the layer math is
the family's `forward`, shared by every schedule.
"""

from __future__ import annotations

import torch

from runtime.layers import KVSlot, Layer, StepContext
from runtime.weights import WeightStore


def run_layers(layers: list[Layer], weights: WeightStore, xs: list[torch.Tensor], contexts: list[StepContext],
               caches: list[dict[int, KVSlot]] | None, stop: int | None = None) -> list[torch.Tensor]:
    """Run layers [0, stop) over every micro-batch: xs[k] is micro-batch k's input, contexts[k] its context."""
    xs = list(xs)
    for i, layer in enumerate(layers[:stop]):
        w = weights.fetch(i)
        for k, ctx in enumerate(contexts):
            cache = caches[k].get(i) if caches is not None else None
            xs[k] = layer.forward(w, xs[k], ctx, cache)
    return xs
