"""Random-weight models in the real architectures (OPT and the Llama family), built locally once and cached: what
`flexhelm profile --fit` runs (`calibrate.py`), and the benchmarks' models.

Throughput does not depend on weight values, so a random model of the right shape stands in for the real
checkpoint without any download. Each model is its HF `config.json` (`ARCHS`, the published shapes); models live
under `$FLEXHELM_CACHE/bench-models/<name>/` (default `~/.cache/flexhelm`), stored fp16 as the real checkpoints
are. Shapes too large to build here (`PLAN_ONLY`) serve planning: `config_dir` writes their config.json alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def _opt(hidden: int, layers: int, heads: int, ffn: int, vocab: int = 50272) -> dict:
    """Pre-LN, tied head, learned positions: every OPT size but 350m."""
    return {"model_type": "opt", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "ffn_dim": ffn, "vocab_size": vocab, "max_position_embeddings": 2048, "word_embed_proj_dim": hidden,
            "do_layer_norm_before": True, "activation_function": "relu", "torch_dtype": "float16",
            "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, tied: bool, max_positions: int,
           theta: float, model_type: str = "llama", **extra) -> dict:
    return {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
            "intermediate_size": ffn, "vocab_size": vocab, "tie_word_embeddings": tied,
            "max_position_embeddings": max_positions, "rope_theta": theta, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2, **extra}


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
ARCHS: dict[str, dict] = {
    "opt-125m": _opt(768, 12, 12, 3072),
    "opt-1.3b": _opt(2048, 24, 32, 8192),
    "opt-2.7b": _opt(2560, 32, 32, 10240),
    "opt-6.7b": _opt(4096, 32, 32, 16384),
    "smollm2-135m": _llama(576, 30, 9, 3, 1536, 49152, True, 8192, 100000.0),
    "tinyllama-1.1b": _llama(2048, 22, 32, 4, 5632, 32000, False, 2048, 10000.0),
    "llama-3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, True, 131072, 500000.0, rope_scaling=_LLAMA3_ROPE),
    # For smoke tests only (`quick=True`): build and run in well under a second.
    "opt-tiny": _opt(64, 2, 4, 256),
    "llama-tiny": _llama(64, 2, 4, 2, 128, 1000, False, 2048, 10000.0),
}
PLAN_ONLY: dict[str, dict] = {
    "llama-3-70b": _llama(8192, 80, 64, 8, 28672, 128256, False, 8192, 500000.0),
    "qwen2.5-72b": _llama(8192, 80, 64, 8, 29568, 152064, False, 32768, 1000000.0, model_type="qwen2",
                          rms_norm_eps=1e-6, torch_dtype="bfloat16"),
}


def spec(name: str):
    """The `ModelSpec` of a random-weight model, from its config alone."""
    from runtime.families import spec_from_config

    return spec_from_config(_config(name))


def _config(name: str) -> dict:
    if name in ARCHS:
        return ARCHS[name]
    if name in PLAN_ONLY:
        return PLAN_ONLY[name]
    raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join([*ARCHS, *PLAN_ONLY])}")


def cache_root() -> Path:
    return Path(os.environ.get("FLEXHELM_CACHE") or Path.home() / ".cache" / "flexhelm")


def model_dir(name: str) -> Path:
    return cache_root() / "bench-models" / name


def config_dir(name: str, out: Path) -> Path:
    """A folder holding only `name`'s config.json: enough for `flexhelm plan`, for any size."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_config(name), indent=2) + "\n")
    return out


def ensure_model(name: str) -> Path:
    """The folder of model `name`, built on first use."""
    if name not in ARCHS:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(ARCHS)}")
    out = model_dir(name)
    if _complete(out):
        return out
    print(f"building random-weight {name} under {out} (once)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a crash leaves a stray temp folder, never a half model that a
    # later run would take for complete (rename within one file system is atomic).
    tmp = out.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(ARCHS[name], tmp)
        if not _complete(out):  # else another process finished first: keep its model
            shutil.rmtree(out, ignore_errors=True)  # an incomplete folder that was not built here
            try:
                os.rename(tmp, out)
            except OSError:
                if not _complete(out):  # lost a race to a concurrent build: fine once that one is whole
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _build(config: dict, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")}
    hf_config = AutoConfig.for_model(config["model_type"], **kw)
    torch.manual_seed(0)
    # Construct directly in fp16: building in fp32 first would hold twice the fp16 size (opt-6.7b:
    # 27 GB, more than this machine's RAM). Random weights do not need fp32 initialization.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = AutoModelForCausalLM.from_config(hf_config)
    finally:
        torch.set_default_dtype(previous)
    # transformers 5 always writes safetensors (4.x did by default): no `safe_serialization` argument,
    # which 5.x no longer names.
    model.to(torch.float16).save_pretrained(out)
