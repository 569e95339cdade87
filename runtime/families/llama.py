"""The Llama family's math (Llama 1/2/3, SmolLM2, TinyLlama, Mistral, Qwen2/2.5), as in HF `LlamaForCausalLM`,
`MistralForCausalLM` and `Qwen2ForCausalLM`: RMSNorm, rotary positions (cos/sin from `StepContext.rotary`),
grouped-query attention over a cache of the KV heads only, a SwiGLU MLP. Weights and their layout:
`runtime.families.llama_config`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime import layers, rotary
from runtime.families.llama_config import layout
from runtime.families.llama_config import spec_from_config as spec_from_config  # re-exported: the family's API
from runtime.kernels import linear
from runtime.layers import ShapedLayer, StepContext, attention
from runtime.spec import ModelSpec

_ACTIVATIONS = {"silu": F.silu}


def build_layers(spec: ModelSpec) -> list:
    return layers.build_layers(spec, layout(spec), {"embedding": Embedding, "decoder": DecoderLayer, "head": Head})


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm, written as HF writes it: normalized in fp32, cast back to x's dtype, then scaled.
    Not `F.rms_norm`: on the CPU (torch 2.13) its kernel took 4.7-9.1 ms on (4, 1024, 576) fp32 against 1.6-1.7
    for these three ops, with equal results; 12% of a SmolLM2 scoring pass."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., d)
    return weight * h.to(x.dtype)


class Embedding(ShapedLayer):
    """Token ids (B, T) -> hidden states (B, T, h): the token table only (positions are rotary)."""

    def forward(self, w, x, ctx: StepContext, cache=None):
        return F.embedding(x, w["tokens"]).to(ctx.dtype)  # (B, T, h)


class DecoderLayer(ShapedLayer):
    """One decoder layer: (B, T, h) -> (B, T, h), appending its rotated keys and values to the cache."""

    has_cache = True

    def forward(self, w, x, ctx: StepContext, cache):
        s = self.spec
        B, T, _ = x.shape
        nh, kvh, d = s.num_heads, s.num_kv_heads, s.head_dim

        qkv = layers.by_rows(lambda r: linear(rms_norm(r, w["attn_norm.weight"], s.norm_eps), w["qkv.weight"],
                                              w.get("qkv.bias")), x)  # (B, T, (nh + 2 kvh) d)
        q, k, v = qkv.split((nh * d, kvh * d, kvh * d), dim=-1)
        q = q.view(B, T, nh, d).transpose(1, 2)  # (B, nh, T, d)
        k = k.view(B, T, kvh, d).transpose(1, 2)  # (B, kvh, T, d)
        v = v.view(B, T, kvh, d).transpose(1, 2)
        cos, sin = ctx.rotary
        q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
        # the cache appends this step's keys/values and attends over all of them, on whichever tier
        a = attention(q, k, v, ctx) if cache is None else cache.attend(q, k, v, ctx)  # (B, nh, T, d)
        a = a.transpose(1, 2).reshape(B, T, nh * d)
        return layers.by_rows(lambda r, ar: self._mlp(w, r + linear(ar, w["out.weight"], w.get("out.bias"))), x, a)

    def _mlp(self, w, x: torch.Tensor) -> torch.Tensor:
        """(n, h) rows -> rows + SwiGLU(RMSNorm(rows))."""
        s = self.spec
        hidden = rms_norm(x, w["mlp_norm.weight"], s.norm_eps)
        gate, up = linear(hidden, w["gate_up.weight"], w.get("gate_up.bias")).chunk(2, dim=-1)  # (n, f) each
        return x + linear(_ACTIVATIONS[s.activation](gate).mul_(up), w["down.weight"], w.get("down.bias"))


class Head(ShapedLayer):
    """Hidden states (B, T, h) -> logits (B, T', vocab) at `ctx.logit_positions` only."""

    def forward(self, w, x, ctx: StepContext, cache=None):
        if ctx.logit_positions is not None:
            x = x[:, ctx.logit_positions]  # (B, T', h): the head is the widest matmul; skip unused rows
        return linear(rms_norm(x, w["norm.weight"], self.spec.norm_eps), w["lm_head"])  # (B, T', vocab)
