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


def assert_layout_matches(spec, hf) -> None:
    """The family's weights cover HF's state dict exactly (a tied head once), with the shapes HF's have, and the
    parameter count is HF's."""
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert spec.num_parameters() == sum(p.numel() for p in hf.parameters())
    covered = set()
    for layer in get_family(spec.family).build_layers(spec):
        for w in layer.weight_specs():
            rows = sum(shapes[s][0] for s in w.sources)
            assert (rows, *shapes[w.sources[0]][1:]) == w.shape, (w.key, w.sources)
            covered.update(w.sources)
    tied = {"lm_head.weight"} if spec.tied_embeddings else set()
    assert covered == set(shapes) - tied


@pytest.mark.parametrize("size", list(SIZES))
def test_spec_and_weight_layout_match_hf(size):
    from transformers import OPTConfig, OPTForCausalLM

    config = opt_config(size)
    family = get_family("opt")
    spec = family.spec_from_config(config)
    with torch.device("meta"):  # no memory: shapes only, even for 175B
        hf = OPTForCausalLM(OPTConfig(**config))
    assert_layout_matches(spec, hf)
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


# Published Llama-family shapes (the benchmark models' configs, and two planned only): parameter counts and the
# weight layout against HF's own classes on the meta device.
LLAMA_FAMILY = ["smollm2-135m", "tinyllama-1.1b", "llama-3.2-1b", "llama-3-70b", "qwen2.5-72b"]


@pytest.mark.parametrize("name", LLAMA_FAMILY)
def test_llama_family_spec_and_layout_match_hf(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.planning.random_models import ARCHS, PLAN_ONLY
    from runtime.families import spec_from_config

    config = {**ARCHS, **PLAN_ONLY}[name]
    spec = spec_from_config(config)
    hf_config = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
    assert_layout_matches(spec, hf)
    assert spec.q_size // spec.kv_size == spec.num_heads // spec.num_kv_heads


def llama_config(**overrides) -> dict:
    return {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, **overrides}


def test_llama_config_reads_both_rope_formats_head_dim_and_eos_lists():
    from runtime.families import spec_from_config

    old = spec_from_config(llama_config(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0}))
    new = spec_from_config(llama_config(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}))
    assert old.rope == new.rope and (old.rope.type, old.rope.theta, old.rope.factor) == ("linear", 5e5, 4.0)
    spec = spec_from_config(llama_config(head_dim=32, eos_token_id=[7, 9], max_position_embeddings=100,
                                         rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert (spec.head_dim, spec.q_size, spec.kv_size, spec.eos_token_ids) == (32, 128, 64, (7, 9))
    assert spec.max_positions == 200  # dynamic NTK scaling exists to run beyond the pre-training context
    qwen = spec_from_config(llama_config(model_type="qwen2", sliding_window=4096, use_sliding_window=False))
    assert (qwen.qkv_bias, qwen.out_bias, qwen.sliding_window) == (True, False, None)
    mistral = spec_from_config(llama_config(model_type="mistral", sliding_window=4096))
    assert (mistral.qkv_bias, mistral.sliding_window) == (False, 4096)


def test_generation_config_eos_tokens_join_the_configs(tmp_path):
    import json

    from runtime.families import spec_from_config
    from runtime.spec import read_config

    (tmp_path / "config.json").write_text(json.dumps(llama_config(eos_token_id=5)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6, 8]}))
    assert spec_from_config(read_config(tmp_path)).eos_token_ids == (5, 6, 8)


@pytest.mark.parametrize("overrides,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope"}}, "'longrope' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"num_key_value_heads": 3}, "not a multiple of num_kv_heads"),
    ({"intermediate_size": None}, "impossible model|intermediate_size"),
    ({"model_type": "gemma"}, "unsupported model_type 'gemma'.*llama, mistral, opt, qwen2"),
])
def test_llama_config_errors_name_the_problem(overrides, match):
    from runtime.families import spec_from_config

    config = llama_config(**overrides)
    if config["intermediate_size"] is None:
        del config["intermediate_size"]
    with pytest.raises(CheckpointError, match=match):
        spec_from_config(config)
