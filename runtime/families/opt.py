"""Meta's OPT family (125m .. 175B), as in HF `OPTForCausalLM`.

Quirks handled: learned positions with an offset of 2; OPT-350m's `word_embed_proj_dim` (512) !=
`hidden_size` (1024) with `project_in`/`project_out`, and its post-LN layers (`do_layer_norm_before:
false`, no final norm); tied or untied `lm_head`. Weights and their layout: `runtime.families.opt_config`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime import layers
from runtime.families.opt_config import ACTIVATIONS, layout
from runtime.families.opt_config import spec_from_config as spec_from_config  # re-exported: the family's API
from runtime.kernels import linear
from runtime.layers import ShapedLayer, StepContext, attention
from runtime.spec import ModelSpec

_ACTIVATIONS = {"relu": F.relu_, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "silu": F.silu}  # relu runs in place: the fc1 output is a temporary
assert set(_ACTIVATIONS) == set(ACTIVATIONS)


def build_layers(spec: ModelSpec) -> list:
    return layers.build_layers(spec, layout(spec), {"embedding": Embedding, "decoder": DecoderLayer, "head": Head})


def _layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], key: str, spec: ModelSpec) -> torch.Tensor:
    return F.layer_norm(x, (spec.hidden_size,), w.get(f"{key}.weight"), w.get(f"{key}.bias"), spec.norm_eps)


class Embedding(ShapedLayer):
    """Token ids (B, T) -> hidden states (B, T, h): token embedding (+ project_in) + learned positions."""

    def forward(self, w, x, ctx: StepContext, cache=None):
        h = F.embedding(x, w["tokens"]).to(ctx.dtype)  # (B, T, e)
        if "project_in" in w:
            h = linear(h, w["project_in"])  # (B, T, h)
        # Pads carry position -1 -> row 1 of the table, exactly as HF computes them.
        return h + F.embedding(ctx.positions + self.spec.position_offset, w["positions"]).to(ctx.dtype)


class DecoderLayer(ShapedLayer):
    """One OPT decoder layer: (B, T, h) -> (B, T, h), appending its keys/values to the cache."""

    has_cache = True

    def forward(self, w, x, ctx: StepContext, cache):
        s = self.spec
        B, T, h = x.shape
        nh, d = s.num_heads, s.head_dim

        qkv = layers.by_rows(lambda r: linear(_layer_norm(r, w, "attn_norm", s) if s.norm_before else r,
                                              w["qkv.weight"], w.get("qkv.bias")), x)  # (B, T, 3h)
        q, k, v = qkv.reshape(B, T, 3, nh, d).permute(2, 0, 3, 1, 4)  # each (B, nh, T, d)
        # the cache appends this step's keys/values and attends over all of them, on whichever tier
        a = attention(q, k, v, ctx) if cache is None else cache.attend(q, k, v, ctx)  # (B, nh, T, d)
        a = a.transpose(1, 2).reshape(B, T, h)
        return layers.by_rows(lambda r, ar: self._mlp(w, r + linear(ar, w["out.weight"], w.get("out.bias"))), x, a)

    def _mlp(self, w, x: torch.Tensor) -> torch.Tensor:
        """(n, h) rows after attention's residual -> the layer's output rows (norms where the variant puts them)."""
        s = self.spec
        if not s.norm_before:
            x = _layer_norm(x, w, "attn_norm", s)
        hidden = _layer_norm(x, w, "mlp_norm", s) if s.norm_before else x
        hidden = _ACTIVATIONS[s.activation](linear(hidden, w["fc1.weight"], w.get("fc1.bias")))  # (n, ffn)
        x = x + linear(hidden, w["fc2.weight"], w.get("fc2.bias"))
        return _layer_norm(x, w, "mlp_norm", s) if not s.norm_before else x


class Head(ShapedLayer):
    """Hidden states (B, T, h) -> logits (B, T', vocab) at `ctx.logit_positions` only."""

    def forward(self, w, x, ctx: StepContext, cache=None):
        if ctx.logit_positions is not None:
            x = x[:, ctx.logit_positions]  # (B, T', h): the head is the widest matmul; skip unused rows
        if self.spec.final_norm:
            x = _layer_norm(x, w, "norm", self.spec)
        if "project_out" in w:
            x = linear(x, w["project_out"])  # (B, T', e)
        return linear(x, w["lm_head"])  # (B, T', vocab)
