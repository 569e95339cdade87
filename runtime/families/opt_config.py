"""OPT's `config.json` -> `ModelSpec`, without torch: planning and HELM registration read configs of models
they never load (`runtime.families.opt` builds the layers)."""

from __future__ import annotations

from runtime.errors import CheckpointError
from runtime.spec import ModelSpec

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")


def spec_from_config(config: dict) -> ModelSpec:
    """A `ModelSpec` from an OPT `config.json`; missing keys take HF `OPTConfig`'s defaults."""
    try:
        hidden = int(config["hidden_size"])
        norm_before = bool(config.get("do_layer_norm_before", True))
        activation = config.get("activation_function", "relu")
        if activation not in ACTIVATIONS:
            raise CheckpointError(f"config.json: activation_function {activation!r} is not supported "
                                  f"(supported: {', '.join(ACTIVATIONS)})")
        return ModelSpec(
            family="opt",
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            num_kv_heads=int(config["num_attention_heads"]),
            ffn_size=int(config["ffn_dim"]),
            vocab_size=int(config["vocab_size"]),
            max_positions=int(config.get("max_position_embeddings", 2048)),
            embed_dim=int(config.get("word_embed_proj_dim") or hidden),
            norm_before=norm_before,
            final_norm=norm_before and not config.get("_remove_final_layer_norm", False),
            norm_affine=bool(config.get("layer_norm_elementwise_affine", True)),
            norm_eps=1e-5,
            activation=activation,
            positional="learned",
            position_offset=2,
            bias=bool(config.get("enable_bias", True)),
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        )
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the key {e.args[0]!r} that an OPT config needs") from None
    except ValueError as e:
        raise CheckpointError(f"config.json describes an impossible model: {e}") from None
