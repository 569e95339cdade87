"""The Llama family's `config.json` -> `ModelSpec`, and its weight layout, without torch: Llama 1/2/3
(`LlamaForCausalLM`, SmolLM2, TinyLlama), Mistral (`MistralForCausalLM`) and Qwen2/2.5 (`Qwen2ForCausalLM`) share
one architecture: RMSNorm before attention and MLP, rotary positions, grouped-query attention, a SwiGLU MLP.
They differ in configuration only: Qwen2's q/k/v biases, Mistral's sliding window, Llama 3's rope scaling and
EOS lists, explicit `head_dim`s. `runtime.families.llama` holds the math.
"""

from __future__ import annotations

from runtime.errors import CheckpointError
from runtime.spec import ROPE_TYPES, LayerShape, ModelSpec, RopeSpec, WeightSpec, eos_ids

ACTIVATIONS = ("silu",)
_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}  # HF configs' defaults
_PREFIX = "model."


def spec_from_config(config: dict) -> ModelSpec:
    """A `ModelSpec` from a Llama, Mistral or Qwen2 `config.json`; missing keys take the HF config's defaults."""
    kind = config.get("model_type")
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or 0) or hidden // heads
        if not config.get("head_dim") and hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        activation = config.get("hidden_act", "silu")
        if activation not in ACTIVATIONS:
            raise CheckpointError(f"config.json: hidden_act {activation!r} is not supported "
                                  f"(supported: {', '.join(ACTIVATIONS)})")
        max_positions = int(config.get("max_position_embeddings") or _MAX_POSITIONS[kind])
        rope = _rope(config, max_positions)
        if rope.type == "dynamic":  # dynamic NTK scaling exists to run beyond the pre-training context
            max_positions = int(max_positions * rope.factor)
        attention_bias = bool(config.get("attention_bias", False))
        return ModelSpec(
            family="llama", hidden_size=hidden, num_layers=int(config["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, ffn_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]), max_positions=max_positions, embed_dim=hidden, norm="rmsnorm",
            norm_before=True, final_norm=True, norm_affine=True,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)), activation=activation, gated_mlp=True,
            positional="rotary", position_offset=0, rope=rope, sliding_window=_window(config),
            qkv_bias=kind == "qwen2" or attention_bias, out_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)), bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids(config.get("eos_token_id")), pad_token_id=config.get("pad_token_id"),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        )
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the key {e.args[0]!r} that a {kind} config needs") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json describes an impossible model: {e}") from None


def _rope(config: dict, max_positions: int) -> RopeSpec:
    """Rotary parameters from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("config.json: rope_parameters per layer type are not supported")
    params.update(config.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"config.json: rope scaling type {kind!r} is not supported "
                              f"(supported: {', '.join(ROPE_TYPES)})")
    if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise CheckpointError("config.json: partial_rotary_factor != 1 is not supported")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if kind == "default":
        return RopeSpec(theta)
    factor = float(params["factor"])
    if kind == "llama3":
        return RopeSpec(theta, kind, factor, float(params["low_freq_factor"]), float(params["high_freq_factor"]),
                        int(params.get("original_max_position_embeddings") or max_positions))
    return RopeSpec(theta, kind, factor, original_max_positions=max_positions)


def _window(config: dict) -> int | None:
    """Mistral's sliding window (None: full attention). Qwen2 windows only some layers where `use_sliding_window`
    is set; its released checkpoints leave it off, and a per-layer window is refused rather than computed wrong."""
    if config.get("model_type") == "qwen2":
        if config.get("use_sliding_window"):
            raise CheckpointError("config.json: Qwen2's use_sliding_window (a window on some layers only) is not "
                                  "supported; its released checkpoints set it to false")
        return None
    window = config.get("sliding_window")
    return int(window) if window else None


def layout(s: ModelSpec) -> list[LayerShape]:
    """Embedding, decoder layers, head. q, k and v are fused into one matrix, and gate and up into another: at
    decode-sized batches one wide GEMM runs faster than two or three narrow ones."""
    tokens = _PREFIX + "embed_tokens.weight"
    embedding = (WeightSpec("tokens", (s.vocab_size, s.hidden_size), (tokens,), lookup=True, in_memory=True),)
    # A tied head names the embedding's tensor: the weight store keeps one copy for both layers.
    head = (WeightSpec("norm.weight", (s.hidden_size,), (_PREFIX + "norm.weight",)),
            WeightSpec("lm_head", (s.vocab_size, s.hidden_size), (tokens if s.tied_embeddings else "lm_head.weight",),
                       in_memory=True))
    return [LayerShape("embedding", "embedding", embedding),
            *(LayerShape(f"layer{i}", "decoder", _decoder(s, i)) for i in range(s.num_layers)),
            LayerShape("head", "head", head)]


def _decoder(s: ModelSpec, i: int) -> tuple[WeightSpec, ...]:
    p = f"{_PREFIX}layers.{i}."
    h, f, q, kv = s.hidden_size, s.ffn_size, s.q_size, s.kv_size
    qkv = tuple(f"{p}self_attn.{n}_proj" for n in "qkv")
    gate_up = (p + "mlp.gate_proj", p + "mlp.up_proj")
    specs = (WeightSpec("qkv.weight", (q + 2 * kv, h), tuple(n + ".weight" for n in qkv)),
             WeightSpec("out.weight", (h, q), (p + "self_attn.o_proj.weight",)),
             WeightSpec("gate_up.weight", (2 * f, h), tuple(n + ".weight" for n in gate_up)),
             WeightSpec("down.weight", (h, f), (p + "mlp.down_proj.weight",)))
    if s.qkv_bias:
        specs += (WeightSpec("qkv.bias", (q + 2 * kv,), tuple(n + ".bias" for n in qkv)),)
    if s.out_bias:
        specs += (WeightSpec("out.bias", (h,), (p + "self_attn.o_proj.bias",)),)
    if s.mlp_bias:
        specs += (WeightSpec("gate_up.bias", (2 * f,), tuple(n + ".bias" for n in gate_up)),
                  WeightSpec("down.bias", (h,), (p + "mlp.down_proj.bias",)))
    return specs + (WeightSpec("attn_norm.weight", (h,), (p + "input_layernorm.weight",)),
                    WeightSpec("mlp_norm.weight", (h,), (p + "post_attention_layernorm.weight",)))
