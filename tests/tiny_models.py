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


_K_BLOCK = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}
"""K-quant blocks (256 values): bytes per block and the offsets of their fp16 scales (gguf writes no K-quants)."""


def build_gguf(out: Path, model_dir: Path, matrix_type: str = "F32", arch: str = "llama", name: str = "tiny",
               seed: int = 0) -> Path:
    """A GGUF file of the HF Llama-family checkpoint in `model_dir`, laid out as llama.cpp's converter writes it:
    its metadata keys, its tensor names, q and k rows permuted for llama (not qwen2), the tokenizer's vocabulary
    and merges. Matrices are stored as `matrix_type` (K-quants as random valid blocks, since `gguf` cannot
    quantize them), norms as F32. Returns the file."""
    import json

    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import quantize
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    state = {k: v.float() for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    w = GGUFWriter(out, arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<extra_{i}>" for i in range(cfg.vocab_size - len(vocab))]
    specials = {t["content"] for t in tok.get("added_tokens", [])}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in specials else TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    rng = np.random.default_rng(seed)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf, t in state.items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        layer, _, rest = hf.removeprefix("model.layers.").partition(".")
        gguf_name = names.get(hf) or f"blk.{layer}.{parts[rest.rsplit('.', 1)[0]]}.{rest.rsplit('.', 1)[1]}"
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gguf_name.split(".")[-2])
        if arch == "llama" and heads:  # llama.cpp pairs adjacent rotary values; HF rotates the two halves
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
        values = t.numpy()
        if t.dim() != 2 or matrix_type == "F32":
            w.add_tensor(gguf_name, values.astype(np.float32))
        elif matrix_type in _K_BLOCK:
            size, scales = _K_BLOCK[matrix_type]
            blocks = rng.integers(0, 256, (t.shape[0], t.shape[1] // 256, size), dtype=np.uint8)
            for at in scales:  # fp16 scales of a sane size (random bits could be inf or NaN)
                blocks[..., at:at + 2] = rng.uniform(1e-6, 1e-5, blocks.shape[:2] + (1,)).astype(np.float16).view(
                    np.uint8)
            w.add_tensor(gguf_name, blocks.reshape(t.shape[0], -1), raw_dtype=GGMLQuantizationType[matrix_type])
        else:
            qtype = GGMLQuantizationType[matrix_type]
            w.add_tensor(gguf_name, quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def with_eos(folder: Path, out: Path, eos: tuple[int, ...]) -> Path:
    """A copy of the checkpoint in `folder` at `out` whose EOS tokens are `eos` (config.json and
    generation_config.json): the same weights, stopping at other tokens."""
    import json

    shutil.copytree(folder, out)
    for name in ("config.json", "generation_config.json"):
        file = out / name
        if file.is_file():
            file.write_text(json.dumps({**json.loads(file.read_text()), "eos_token_id": list(eos)}))
    return out
