"""`ModelSpec` and the OPT weight layout for every published OPT size, checked against HF on the meta device."""

from __future__ import annotations

import pytest
import torch

from runtime.errors import CheckpointError
from runtime.families import get_family

# (hidden, layers, heads, ffn) of the published OPT models; 350m also has its projection and post-LN.
SIZES = {
    "125m": (768, 12, 12, 3072), "350m": (1024, 24, 16, 4096), "1.3b": (2048, 24, 32, 8192),
    "2.7b": (2560, 32, 32, 10240), "6.7b": (4096, 32, 32, 16384), "13b": (5120, 40, 40, 20480),
    "30b": (7168, 48, 56, 28672), "66b": (9216, 64, 72, 36864), "175b": (12288, 96, 96, 49152),
}


def opt_config(size: str) -> dict:
    h, n, heads, f = SIZES[size]
    return {"model_type": "opt", "hidden_size": h, "num_hidden_layers": n, "num_attention_heads": heads,
            "ffn_dim": f, "vocab_size": 50272, "max_position_embeddings": 2048, "torch_dtype": "float16",
            "word_embed_proj_dim": 512 if size == "350m" else h, "do_layer_norm_before": size != "350m",
            "activation_function": "relu", "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}


@pytest.mark.parametrize("size", list(SIZES))
def test_spec_and_weight_layout_match_hf(size):
    from transformers import OPTConfig, OPTForCausalLM

    config = opt_config(size)
    family = get_family("opt")
    spec = family.spec_from_config(config)
    with torch.device("meta"):  # no memory: shapes only, even for 175B
        hf = OPTForCausalLM(OPTConfig(**config))
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert spec.num_parameters() == sum(p.numel() for p in hf.parameters())
    covered = set()
    for layer in family.build_layers(spec):
        for w in layer.weight_specs():
            rows = sum(shapes[s][0] for s in w.sources)
            assert (rows, *shapes[w.sources[0]][1:]) == w.shape, (w.key, w.sources)
            covered.update(w.sources)
    tied = {"lm_head.weight"} if spec.tied_embeddings else set()
    assert covered == set(shapes) - tied
    assert (spec.embed_dim != spec.hidden_size, spec.norm_before, spec.final_norm) == (
        (True, False, False) if size == "350m" else (False, True, True))


def test_config_errors_name_the_problem():
    family = get_family("opt")
    config = opt_config("125m")
    del config["ffn_dim"]
    with pytest.raises(CheckpointError, match="lacks the key 'ffn_dim'"):
        family.spec_from_config(config)
    with pytest.raises(CheckpointError, match="not divisible"):
        family.spec_from_config({**opt_config("125m"), "num_attention_heads": 7})
    with pytest.raises(CheckpointError, match="activation_function 'swish'"):
        family.spec_from_config({**opt_config("125m"), "activation_function": "swish"})
