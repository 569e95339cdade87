"""Meta's OPT family (125m .. 175B), as in HF `OPTForCausalLM`.

Quirks handled: learned positions with an offset of 2; OPT-350m's `word_embed_proj_dim` (512) !=
`hidden_size` (1024) with `project_in`/`project_out`, and its post-LN layers (`do_layer_norm_before:
false`, no final norm); tied or untied `lm_head`. q, k and v are fused into one (3h, h) matmul, since
at decode-sized batches one wide GEMM runs faster than three narrow ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.families.opt_config import ACTIVATIONS
from runtime.families.opt_config import spec_from_config as spec_from_config  # re-exported: the family's API
from runtime.kernels import linear
from runtime.layers import StepContext, WeightSpec, attention
from runtime.spec import ModelSpec

_PREFIX = "model.decoder."
_ACTIVATIONS = {"relu": F.relu_, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "silu": F.silu}  # relu runs in place: the fc1 output is a temporary
assert set(_ACTIVATIONS) == set(ACTIVATIONS)


def build_layers(spec: ModelSpec) -> list:
    return [Embedding(spec), *(DecoderLayer(spec, i) for i in range(spec.num_layers)), Head(spec)]


def _norm_specs(spec: ModelSpec, key: str, source: str) -> list[WeightSpec]:
    if not spec.norm_affine:
        return []
    h = spec.hidden_size
    return [WeightSpec(f"{key}.weight", (h,), (f"{source}.weight",)),
            WeightSpec(f"{key}.bias", (h,), (f"{source}.bias",))]


def _layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], key: str, spec: ModelSpec) -> torch.Tensor:
    return F.layer_norm(x, (spec.hidden_size,), w.get(f"{key}.weight"), w.get(f"{key}.bias"), spec.norm_eps)


class Embedding:
    """Token ids (B, T) -> hidden states (B, T, h): token embedding (+ project_in) + learned positions."""

    has_cache = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec, self.name = spec, "embedding"

    def weight_specs(self) -> list[WeightSpec]:
        s = self.spec
        specs = [WeightSpec("tokens", (s.vocab_size, s.embed_dim), (_PREFIX + "embed_tokens.weight",), lookup=True,
                            in_memory=True),
                 WeightSpec("positions", (s.max_positions + s.position_offset, s.hidden_size),
                            (_PREFIX + "embed_positions.weight",), lookup=True, in_memory=True)]
        if s.embed_dim != s.hidden_size:
            specs.append(WeightSpec("project_in", (s.hidden_size, s.embed_dim), (_PREFIX + "project_in.weight",)))
        return specs

    def forward(self, w, x, ctx: StepContext, cache=None):
        h = F.embedding(x, w["tokens"]).to(ctx.dtype)  # (B, T, e)
        if "project_in" in w:
            h = linear(h, w["project_in"])  # (B, T, h)
        # Pads carry position -1 -> row 1 of the table, exactly as HF computes them.
        return h + F.embedding(ctx.positions + self.spec.position_offset, w["positions"]).to(ctx.dtype)


class DecoderLayer:
    """One OPT decoder layer: (B, T, h) -> (B, T, h), appending its keys/values to the cache."""

    has_cache = True

    def __init__(self, spec: ModelSpec, index: int) -> None:
        self.spec, self.index, self.name = spec, index, f"layer{index}"
        self.act = _ACTIVATIONS[spec.activation]

    def weight_specs(self) -> list[WeightSpec]:
        s, p = self.spec, f"{_PREFIX}layers.{self.index}."
        h, f = s.hidden_size, s.ffn_size
        qkv = tuple(f"{p}self_attn.{n}_proj" for n in "qkv")
        specs = [WeightSpec("qkv.weight", (3 * h, h), tuple(n + ".weight" for n in qkv)),
                 WeightSpec("out.weight", (h, h), (p + "self_attn.out_proj.weight",)),
                 WeightSpec("fc1.weight", (f, h), (p + "fc1.weight",)),
                 WeightSpec("fc2.weight", (h, f), (p + "fc2.weight",))]
        if s.bias:
            specs += [WeightSpec("qkv.bias", (3 * h,), tuple(n + ".bias" for n in qkv)),
                      WeightSpec("out.bias", (h,), (p + "self_attn.out_proj.bias",)),
                      WeightSpec("fc1.bias", (f,), (p + "fc1.bias",)),
                      WeightSpec("fc2.bias", (h,), (p + "fc2.bias",))]
        return (specs + _norm_specs(s, "attn_norm", p + "self_attn_layer_norm")
                + _norm_specs(s, "mlp_norm", p + "final_layer_norm"))

    def forward(self, w, x, ctx: StepContext, cache):
        s = self.spec
        B, T, h = x.shape
        nh, d = s.num_heads, s.head_dim

        residual = x
        if s.norm_before:
            x = _layer_norm(x, w, "attn_norm", s)
        qkv = linear(x, w["qkv.weight"], w.get("qkv.bias"))  # (B, T, 3h)
        q, k, v = qkv.reshape(B, T, 3, nh, d).permute(2, 0, 3, 1, 4)  # each (B, nh, T, d)
        # the cache appends this step's keys/values and attends over all of them, on whichever tier
        a = attention(q, k, v, ctx) if cache is None else cache.attend(q, k, v, ctx)  # (B, nh, T, d)
        a = a.transpose(1, 2).reshape(B, T, h)
        x = residual + linear(a, w["out.weight"], w.get("out.bias"))
        if not s.norm_before:
            x = _layer_norm(x, w, "attn_norm", s)

        residual = x
        if s.norm_before:
            x = _layer_norm(x, w, "mlp_norm", s)
        x = linear(self.act(linear(x, w["fc1.weight"], w.get("fc1.bias"))), w["fc2.weight"], w.get("fc2.bias"))
        x = residual + x
        if not s.norm_before:
            x = _layer_norm(x, w, "mlp_norm", s)
        return x


class Head:
    """Hidden states (B, T, h) -> logits (B, T', vocab) at `ctx.logit_positions` only."""

    has_cache = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec, self.name = spec, "head"

    def weight_specs(self) -> list[WeightSpec]:
        s = self.spec
        specs = _norm_specs(s, "norm", _PREFIX + "final_layer_norm") if s.final_norm else []
        if s.embed_dim != s.hidden_size:
            specs.append(WeightSpec("project_out", (s.embed_dim, s.hidden_size), (_PREFIX + "project_out.weight",)))
        # A tied head names the embedding's tensor: the weight store keeps one copy for both layers.
        source = _PREFIX + "embed_tokens.weight" if s.tied_embeddings else "lm_head.weight"
        return specs + [WeightSpec("lm_head", (s.vocab_size, s.embed_dim), (source,), in_memory=True)]

    def forward(self, w, x, ctx: StepContext, cache=None):
        if ctx.logit_positions is not None:
            x = x[:, ctx.logit_positions]  # (B, T', h): the head is the widest matmul; skip unused rows
        if self.spec.final_norm:
            x = _layer_norm(x, w, "norm", self.spec)
        if "project_out" in w:
            x = linear(x, w["project_out"])  # (B, T', e)
        return linear(x, w["lm_head"])  # (B, T', vocab)
