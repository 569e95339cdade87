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

from runtime.policy import ROW_CHUNK
from runtime.spec import LayerShape, ModelSpec, WeightSpec


@dataclass
class StepContext:
    """What one forward pass of one micro-batch needs besides weights; built by the engine."""

    positions: torch.Tensor
    """(B, T) long: position of each new token (left padding: pads get -1; a scoring pass's right pads continue
    their row's count)."""
    attn_mask: torch.Tensor | None
    """(B, 1, T, S) bool, True = may attend; None when no row is padded (then causal by shape)."""
    cache_start: int
    """Index in the cache where this step's keys and values go (= tokens already cached)."""
    logit_positions: slice | None = None
    """Positions of the new tokens whose logits the head computes (None = all)."""
    dtype: torch.dtype = torch.float32
    """Compute dtype of activations."""
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    """Rotary models: (cos, sin), each (B, 1, T, head_dim) at `positions`, computed once per step for all layers."""
    score: object | None = None
    """Scoring: per row, (item, end column) of the continuation its head scores (`runtime.scoring.ScoringHead`)."""


class Layer(Protocol):
    """A unit of weights and math; `forward` maps (B, T, ...) inputs to (B, T', ...) outputs."""

    name: str
    has_cache: bool

    def weight_specs(self) -> list[WeightSpec]: ...

    def forward(self, w: dict[str, torch.Tensor], x: torch.Tensor, ctx: StepContext,
                cache) -> torch.Tensor: ...


class ShapedLayer:
    """A family's layer built from its `LayerShape` (the family's torch-free layout): name and weights come from it."""

    has_cache = False

    def __init__(self, spec: ModelSpec, shape: LayerShape) -> None:
        self.spec, self.name, self._weights = spec, shape.name, list(shape.weights)

    def weight_specs(self) -> list[WeightSpec]:
        return self._weights


def build_layers(spec: ModelSpec, shapes: list[LayerShape], classes: dict[str, type]) -> list:
    """One layer per `LayerShape`, of the class its kind names (`embedding`, `decoder`, `head`)."""
    return [classes[shape.kind](spec, shape) for shape in shapes]


def by_rows(fn, *xs: torch.Tensor) -> torch.Tensor:
    """fn over the rows of xs ((..., w_i) each, same leading dims) as (n, w_i) chunks of ROW_CHUNK rows -> (..., w'):
    a prefill's per-token work (norms, projections, MLP) keeps its (rows, width) intermediates in cache instead of
    streaming (B * T, ffn) tensors through RAM."""
    lead = xs[0].shape[:-1]
    rows = [x.reshape(-1, x.shape[-1]) for x in xs]  # (n, w_i)
    n = rows[0].shape[0]
    if n <= ROW_CHUNK:
        y = fn(*rows)
        return y.view(*lead, y.shape[-1])
    first = fn(*(r[:ROW_CHUNK] for r in rows))
    out = first.new_empty((n, first.shape[-1]))
    out[:ROW_CHUNK] = first
    for a in range(ROW_CHUNK, n, ROW_CHUNK):
        out[a:a + ROW_CHUNK] = fn(*(r[a:a + ROW_CHUNK] for r in rows))
    return out.view(*lead, out.shape[-1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, T, D) queries over (B, kvH, S, D) keys/values; query head i reads
    KV head i // (H / kvH) (grouped-query attention, as HF's `repeat_kv`)."""
    B, H, T, D = q.shape
    kvh = k.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # No padding: a prefill chunk starting at 0 is plain causal; a single decode token sees everything.
    causal = T > 1 and ctx.attn_mask is None
    if causal and ctx.cache_start != 0:
        raise ValueError("an unpadded multi-token step after the first needs an explicit mask")
    if kvh != H and T == 1:
        # Decode under GQA: a group's query heads as the rows of one query over their shared keys. Measured here
        # (TinyLlama's 32/4 heads, batch 8, 96 keys): 69 us against 157 with `enable_gqa` and 2170 with the keys
        # repeated per head. The (B, 1, 1, S) mask broadcasts over the rows.
        return sdpa(q.reshape(B, kvh, H // kvh, D), k, v, attn_mask=ctx.attn_mask).reshape(B, H, 1, D)
    return sdpa(q, k, v, attn_mask=ctx.attn_mask, is_causal=causal, enable_gqa=kvh != H)
