"""The per-layer interface every family implements, and the per-step context the engine hands it.

A model is a list of layers: an input embedding, the decoder layers, an output head (FlexGen's
`InputEmbed`, `TransformerLayer`, `OutputEmbed`). The engine moves each layer's weights to the
compute device (loading, converting or dequantizing them), then calls `forward` once per micro-batch,
so a loaded layer is reused across the whole block. Layers are stateless: weights, cache and context
are arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class WeightSpec:
    """One compute-ready weight of a layer, built from one or more checkpoint tensors."""

    key: str
    """Name inside the layer (`qkv.weight`)."""
    shape: tuple[int, ...]
    """Shape after concatenation."""
    sources: tuple[str, ...]
    """Checkpoint tensor names, concatenated along dim 0 (fused q/k/v) in this order."""
    lookup: bool = False
    """A table the layer only indexes (embeddings): fetched in its stored dtype, the layer casts the rows it
    takes, so a 50k x h table is never converted whole."""
    in_memory: bool = False
    """Never placed on disk (a disk placement keeps it in RAM): the embedding tables and the head, which a
    step needs whole. Staged from disk, such a weight would take a buffer of its own size anyway, and a
    read per step: on opt-1.3b the tied 206 MB table was read twice a step, into both staging slots."""


@dataclass
class StepContext:
    """What one forward pass of one micro-batch needs besides weights; built by the engine."""

    positions: torch.Tensor
    """(B, T) long: position of each new token (left padding: pads get -1)."""
    attn_mask: torch.Tensor | None
    """(B, 1, T, S) bool, True = may attend; None when no row is padded (then causal by shape)."""
    cache_start: int
    """Index in the cache where this step's keys and values go (= tokens already cached)."""
    logit_positions: slice | None = None
    """Positions of the new tokens whose logits the head computes (None = all)."""
    dtype: torch.dtype = torch.float32
    """Compute dtype of activations."""


class Layer(Protocol):
    """A unit of weights and math; `forward` maps (B, T, ...) inputs to (B, T', ...) outputs."""

    name: str
    has_cache: bool

    def weight_specs(self) -> list[WeightSpec]: ...

    def forward(self, w: dict[str, torch.Tensor], x: torch.Tensor, ctx: StepContext,
                cache) -> torch.Tensor: ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, T, D) queries over (B, kvH, S, D) keys/values."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat each kv head for its query group
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if ctx.attn_mask is not None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask)
    # No padding: a prefill chunk starting at 0 is plain causal; a single decode token sees everything.
    causal = q.shape[2] > 1
    if causal and ctx.cache_start != 0:
        raise ValueError("an unpadded multi-token step after the first needs an explicit mask")
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
