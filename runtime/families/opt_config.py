"""OPT's `config.json` -> `ModelSpec`, and its weight layout, without torch: planning and HELM registration read
configs of models they never load (`runtime.families.opt` holds the math)."""

from __future__ import annotations

from runtime.errors import CheckpointError
from runtime.spec import LayerShape, ModelSpec, WeightSpec, eos_ids

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
PREFIX = "model.decoder."


def spec_from_config(config: dict) -> ModelSpec:
    """A `ModelSpec` from an OPT `config.json`; missing keys take HF `OPTConfig`'s defaults."""
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        norm_before = bool(config.get("do_layer_norm_before", True))
        activation = config.get("activation_function", "relu")
        if activation not in ACTIVATIONS:
            raise CheckpointError(f"config.json: activation_function {activation!r} is not supported "
                                  f"(supported: {', '.join(ACTIVATIONS)})")
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        bias = bool(config.get("enable_bias", True))
        return ModelSpec(
            family="opt", hidden_size=hidden, num_layers=int(config["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=heads, head_dim=hidden // heads, ffn_size=int(config["ffn_dim"]),
            vocab_size=int(config["vocab_size"]), max_positions=int(config.get("max_position_embeddings", 2048)),
            embed_dim=int(config.get("word_embed_proj_dim") or hidden), norm="layernorm", norm_before=norm_before,
            final_norm=norm_before and not config.get("_remove_final_layer_norm", False),
            norm_affine=bool(config.get("layer_norm_elementwise_affine", True)), norm_eps=1e-5,
            activation=activation, gated_mlp=False, positional="learned", position_offset=2, rope=None,
            sliding_window=None, qkv_bias=bias, out_bias=bias, mlp_bias=bias,
            tied_embeddings=bool(config.get("tie_word_embeddings", True)), bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids(config.get("eos_token_id")), pad_token_id=config.get("pad_token_id"),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        )
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the key {e.args[0]!r} that an OPT config needs") from None
    except ValueError as e:
        raise CheckpointError(f"config.json describes an impossible model: {e}") from None


def layout(s: ModelSpec) -> list[LayerShape]:
    """Embedding, decoder layers, head: every weight with its checkpoint sources (q, k, v fused into one matrix:
    at decode-sized batches one wide GEMM runs faster than three narrow ones)."""
    return [LayerShape("embedding", "embedding", _embedding(s)),
            *(LayerShape(f"layer{i}", "decoder", _decoder(s, i)) for i in range(s.num_layers)),
            LayerShape("head", "head", _head(s))]


def _norm(s: ModelSpec, key: str, source: str) -> tuple[WeightSpec, ...]:
    if not s.norm_affine:
        return ()
    h = s.hidden_size
    return (WeightSpec(f"{key}.weight", (h,), (f"{source}.weight",)),
            WeightSpec(f"{key}.bias", (h,), (f"{source}.bias",)))


def _embedding(s: ModelSpec) -> tuple[WeightSpec, ...]:
    specs = (WeightSpec("tokens", (s.vocab_size, s.embed_dim), (PREFIX + "embed_tokens.weight",), lookup=True,
                        in_memory=True),
             WeightSpec("positions", (s.max_positions + s.position_offset, s.hidden_size),
                        (PREFIX + "embed_positions.weight",), lookup=True, in_memory=True))
    if s.embed_dim != s.hidden_size:
        specs += (WeightSpec("project_in", (s.hidden_size, s.embed_dim), (PREFIX + "project_in.weight",)),)
    return specs


def _decoder(s: ModelSpec, i: int) -> tuple[WeightSpec, ...]:
    p = f"{PREFIX}layers.{i}."
    h, f = s.hidden_size, s.ffn_size
    qkv = tuple(f"{p}self_attn.{n}_proj" for n in "qkv")
    specs = (WeightSpec("qkv.weight", (3 * h, h), tuple(n + ".weight" for n in qkv)),
             WeightSpec("out.weight", (h, h), (p + "self_attn.out_proj.weight",)),
             WeightSpec("fc1.weight", (f, h), (p + "fc1.weight",)),
             WeightSpec("fc2.weight", (h, f), (p + "fc2.weight",)))
    if s.qkv_bias:
        specs += (WeightSpec("qkv.bias", (3 * h,), tuple(n + ".bias" for n in qkv)),)
    if s.out_bias:
        specs += (WeightSpec("out.bias", (h,), (p + "self_attn.out_proj.bias",)),)
    if s.mlp_bias:
        specs += (WeightSpec("fc1.bias", (f,), (p + "fc1.bias",)), WeightSpec("fc2.bias", (h,), (p + "fc2.bias",)))
    return specs + _norm(s, "attn_norm", p + "self_attn_layer_norm") + _norm(s, "mlp_norm", p + "final_layer_norm")


def _head(s: ModelSpec) -> tuple[WeightSpec, ...]:
    specs = _norm(s, "norm", PREFIX + "final_layer_norm") if s.final_norm else ()
    if s.embed_dim != s.hidden_size:
        specs += (WeightSpec("project_out", (s.embed_dim, s.hidden_size), (PREFIX + "project_out.weight",)),)
    # A tied head names the embedding's tensor: the weight store keeps one copy for both layers.
    source = PREFIX + "embed_tokens.weight" if s.tied_embeddings else "lm_head.weight"
    return specs + (WeightSpec("lm_head", (s.vocab_size, s.embed_dim), (source,), in_memory=True),)
