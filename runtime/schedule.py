"""The block schedule (FlexGen Algorithm 1): for each layer, for each micro-batch of the block:
prefetch the next layer's weights and the next micro-batch's cache and activations, compute this one,
store its cache and activations in the background.

With `overlap` off nothing is prefetched: every load happens when its data is needed, which gives the
plain sequential loop, kept as the reference. Both orders run the same layer math (the family's
`forward`); offloading only changes where data waits, never what is computed.
"""

from __future__ import annotations

import torch

from runtime.activations import Activations
from runtime.layers import Layer, StepContext
from runtime.weights import WeightStore


def run_layers(layers: list[Layer], weights: WeightStore, acts: Activations, contexts: list[StepContext],
               caches: list[dict[int, object]] | None, overlap: bool = True) -> list[torch.Tensor]:
    """Run every layer over every micro-batch; `acts` holds each micro-batch's input and output."""
    last = len(layers) - 1
    nb = len(contexts)
    for i, layer in enumerate(layers):
        # overlap: read the next layers' weights (a whole step: then the next step's first) while this one computes
        w = weights.fetch_ahead(i, len(layers), wrap=True) if overlap else weights.fetch(i)
        for k, ctx in enumerate(contexts):
            if overlap:
                _prefetch_next(i, k, nb, layers, acts, contexts, caches)
            cache = caches[k].get(i) if caches is not None else None
            acts.put(k, layer.forward(w, acts.get(k), ctx, cache), offload=i < last)
    return [acts.get(k) for k in range(nb)]


def _prefetch_next(i: int, k: int, nb: int, run: list[Layer], acts: Activations, contexts: list[StepContext],
                   caches: list[dict[int, object]] | None) -> None:
    """Start loading the inputs of the (layer, micro-batch) that runs after (i, k)."""
    ni, nk = (i, k + 1) if k + 1 < nb else (i + 1, 0)
    if ni >= len(run):
        return
    acts.prefetch(nk)
    if caches is not None and ni in caches[nk]:
        caches[nk][ni].prefetch(contexts[nk].cache_start)


class BlockRunner:
    """Runs blocks on one model under one policy: owns the caches' and activations' tiers and staging."""

    def __init__(self, layers: list[Layer], weights: WeightStore, spec, policy, device: torch.device,
                 dtype: torch.dtype, io=None, offload=None) -> None:
        from runtime.compressed import KVCodec
        from runtime.kv_cache import StagingRing

        self.layers, self.weights, self.spec, self.policy = layers, weights, spec, policy
        self.device, self.dtype, self.io, self.offload = device, dtype, io, offload
        self.scratch_peak = 0
        """Most bytes the KV cache and activation scratch files have occupied on disk (measured)."""
        self.ring = StagingRing(pin=policy.pin_host_memory and device.type == "cuda")
        self.kv_codec = KVCodec(policy.compress_cache, spec.head_dim) if policy.compress_cache else None
        self.cache_peak = {"device": 0, "host": 0, "disk": 0}  # largest KV cache per tier so far
        # Cache tensors are reused across calls: a fresh allocation page-faults on its first write,
        # which cost ~5% of a prefill here.
        self._pool: dict[tuple, list[torch.Tensor]] = {}

    def new_caches(self, batches: list[int], max_len: int) -> list[dict[int, object]]:
        from runtime.kv_cache import make_caches

        caches = make_caches(batches, self.layers, self.spec, max_len, self.policy.cache, self.dtype, self.device,
                             self.io, self.offload, self.ring, self.policy.cpu_attention, self._alloc,
                             self.kv_codec)
        for tier in self.cache_peak:
            placed = sum(s.nbytes for c in caches for s in c.values() if s.tier.value == tier)
            self.cache_peak[tier] = max(self.cache_peak[tier], placed)
        return caches

    def note_scratch(self) -> None:
        """Measure the scratch files' blocks on disk while they exist (they are removed when closed)."""
        if self.offload is not None:
            self.scratch_peak = max(self.scratch_peak, self.offload.scratch_bytes())

    def close_caches(self, caches: list[dict[int, object]]) -> None:
        self.ring.drain()
        self.note_scratch()
        for c in caches:
            for slot in c.values():
                slot.close()
                if slot.tier.value != "disk":
                    for t in (slot.k, slot.v):
                        self._pool.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def _alloc(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._pool.get((tuple(shape), dtype, device))
        if free:
            return free.pop()
        self._pool.clear()  # a new shape: caches of other shapes would only hold memory the plan did not count
        return torch.empty(shape, dtype=dtype, device=device)

    def forward(self, xs: list[torch.Tensor], contexts: list[StepContext], caches, head=None):
        """The block's micro-batches through every layer; `head` replaces the last layer (scoring's head, which
        reduces logits to log-probs a chunk at a time), its weights still read by the schedule."""
        acts = Activations(xs, self.policy.activations, self.device, self.io, self.offload, self.ring)
        layers = self.layers if head is None else [*self.layers[:-1], head]
        try:
            return run_layers(layers, self.weights, acts, contexts, caches, self.policy.overlap)
        finally:
            self.note_scratch()
            acts.close()
