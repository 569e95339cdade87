"""The one place that builds tiny checkpoints for tests: random models saved with `save_pretrained`.

OPT: `pre` (pre-LN, tied head, like 125m..175B), `350m` (post-LN, `word_embed_proj_dim` != `hidden_size` with
project_in/out, no final norm) and `untied`. The Llama family (`LLAMA_VARIANTS`): each variant covers some of
grouped- and multi-query attention, tied and untied heads, an explicit `head_dim`, every rope scaling type,
Qwen2's q/k/v biases, Mistral's sliding window and several EOS tokens. Checkpoints are built once per test
session, in every on-disk layout the runtime reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

VARIANTS = {
    "pre": {},
    "350m": {"word_embed_proj_dim": 24, "do_layer_norm_before": False},
    "untied": {"tie_word_embeddings": False},
}
LAYOUTS = ("safetensors", "sharded", "bin", "bin-sharded")
_LLAMA_BASE = dict(vocab_size=300, hidden_size=48, num_hidden_layers=3, intermediate_size=96, num_attention_heads=4,
                   max_position_embeddings=96, pad_token_id=0, bos_token_id=1, eos_token_id=1, rms_norm_eps=1e-6)
LLAMA_VARIANTS = {
    # model_type, config overrides: every variant is a left-padded-batch reference test against HF
    "llama-gqa": ("llama", {"num_key_value_heads": 2}),
    "llama-mqa-tied-headdim": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True, "head_dim": 16,
                                         "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-dynamic": ("llama", {"num_key_value_heads": 2, "max_position_embeddings": 8,
                                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama3": ("llama", {"num_key_value_heads": 2, "eos_token_id": [1, 2], "rope_theta": 500000.0,
                         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "mistral-window": ("mistral", {"num_key_value_heads": 2, "sliding_window": 4}),
    "qwen2-bias": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
}
_TEXT = ("the quick brown fox jumps over the lazy dog. she sells sea shells by the sea shore. "
         "a stitch in time saves nine. all that glitters is not gold. ") * 20


def build_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer (vocab 300) trained on a few sentences, saved as HF files."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_TEXT], vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out)
    return out


def opt_config(variant: str, **overrides):
    from transformers import OPTConfig

    kw = dict(vocab_size=300, hidden_size=48, num_hidden_layers=3, ffn_dim=96, num_attention_heads=4,
              max_position_embeddings=96, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    kw.update(VARIANTS[variant])
    kw.update(overrides)
    return OPTConfig(**kw)


def build_opt(out: Path, variant: str = "pre", layout: str = "safetensors", dtype: torch.dtype = torch.float32,
              tokenizer: Path | None = None, seed: int = 0, **config):
    """Save a random tiny OPT to `out` in `layout`; returns the HF model (fp32, eval mode) for reference."""
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(opt_config(variant, **config)).eval()
    return _perturb_and_save(model, out, layout, dtype, tokenizer)


def _perturb_and_save(model, out: Path, layout: str, dtype: torch.dtype, tokenizer: Path | None):
    with torch.no_grad():  # random init leaves biases and norms trivial; perturb so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype)
    if layout.startswith("bin"):
        _save_bin(model, out, shards=3 if layout == "bin-sharded" else 1)
    else:
        model.save_pretrained(out, max_shard_size="20KB" if layout == "sharded" else "1GB")
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, out / f.name)
    return model.float()


def _save_bin(model, out: Path, shards: int) -> None:
    """`pytorch_model.bin` (or shards + index) as older HF checkpoints ship them: transformers 5 writes
    only safetensors. Sharded files use the hub's old OPT names, without the `model.` prefix."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k.removeprefix("model."): state[k] for k in names[i::shards]}
        torch.save(part, out / file)
        weight_map.update(dict.fromkeys(part, file))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def llama_config(variant: str, **overrides):
    """The HF config of a Llama-family variant (`LLAMA_VARIANTS`)."""
    from transformers import AutoConfig

    model_type, kw = LLAMA_VARIANTS[variant]
    return AutoConfig.for_model(model_type, **{**_LLAMA_BASE, **kw, **overrides})


def build_llama(out: Path, variant: str = "llama-gqa", layout: str = "safetensors", dtype: torch.dtype = torch.float32,
                tokenizer: Path | None = None, seed: int = 0, **config):
    """Save a random tiny Llama-family model to `out` in `layout`; returns the HF model (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(variant, **config)).eval()
    return _perturb_and_save(model, out, layout, dtype, tokenizer)
