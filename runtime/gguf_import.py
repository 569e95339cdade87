"""GGUF -> a Hugging Face checkpoint folder that the runtime and HF transformers both load.

`import_gguf(FILE, OUT)` writes `config.json`, sharded safetensors (fp16, bf16 or fp32) and the tokenizer files into
OUT. Tensors are read one at a time with positional reads (never the whole file mapped into memory), dequantized
with the `gguf` package, and written as they come (`runtime.safetensors_out`): peak memory is about one tensor.
llama.cpp's converter permutes the rows of q and k in Llama models (its rotary pairs adjacent values, HF's the
two halves); the import undoes it. The tokenizer is the GGUF's own vocabulary, converted by transformers (its
`gguf_file` loading), so it tokenizes exactly as transformers' GGUF loading does.

The output is written into a temporary sibling folder and renamed when complete; `flexhelm_import.json`, written
last, names the source file (size and mtime) and the size of every file, so a damaged or partial import is never
taken for a finished one (`verify`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime.errors import CheckpointError
from runtime.safetensors_out import Entry, expected_files, write_checkpoint

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
"""GGML tensor types the import dequantizes (the `gguf` package's numpy dequantizers)."""
MARKER = "flexhelm_import.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""Stored dtypes of an import: fp16 (the default, what HF checkpoints ship), bf16, or fp32, which holds every
dequantized GGUF value exactly (twice the size)."""
_TENSORS = {  # GGUF name (blk.N. stripped) -> HF name ({} = layer index)
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "attn_q.weight": "model.layers.{}.self_attn.q_proj.weight", "attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "attn_k.weight": "model.layers.{}.self_attn.k_proj.weight", "attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "attn_v.weight": "model.layers.{}.self_attn.v_proj.weight", "attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight", "ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


class GGUFError(CheckpointError):
    """A GGUF file cannot be imported (missing, truncated, of an unsupported architecture or type)."""


@dataclass(frozen=True)
class _Tensor:
    gguf_name: str
    hf_name: str
    type_name: str
    shape: tuple[int, ...]
    """Rows first, as torch shapes it (GGUF lists the fastest dimension first)."""
    offset: int
    nbytes: int


def import_gguf(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "float16", progress: bool = False) -> Path:
    """Import the GGUF `src` into the new folder `out` (which must not exist or be empty); returns `out`."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFError(f"{out} already exists and is not empty: choose a new output folder (an import never "
                           "writes into a folder holding other files)")
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise GGUFError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    meta, tensors = read(src)
    config = hf_config(meta, tensors, dtype)
    entries = [Entry(t.hf_name, torch_dtype, t.shape) for t in tensors]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    needed = sum(expected_files(entries).values())
    try:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        by_name = {t.hf_name: t for t in tensors}
        with open(src, "rb", buffering=0) as f, tqdm(total=len(entries), desc="importing tensors", unit="tensor",
                                                     disable=not progress, leave=False) as bar:
            write_checkpoint(tmp, entries, lambda e: _values(f, by_name[e.name], config).to(torch_dtype),
                             progress=lambda e: bar.update(1))
        _tokenizer(src, tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps({"source": fingerprint(src), "dtype": dtype, "files": files},
                                             indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise GGUFError(f"no space left to import {src.name} into {out.parent}: it needs {needed / 1e6:.0f} MB; "
                               "free some space or choose another output folder") from None
        raise GGUFError(f"cannot write the import of {src.name} into {out.parent}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify(out: Path, src: Path | None = None) -> bool:
    """Whether `out` holds a finished import (of `src` as it is now, when given): marker present, every file
    listed there present with its size."""
    try:
        marker = json.loads((out / MARKER).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if src is not None and marker.get("source") != fingerprint(src):
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in files.items())


def read(src: Path) -> tuple[dict, list[_Tensor]]:
    """The metadata and the tensors of a GGUF file, checked: magic, architecture, types, names, sizes."""
    from gguf import GGUFReader

    if not src.is_file():
        raise GGUFError(f"GGUF file {src} does not exist")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{src} is not a GGUF file (no GGUF magic at its start)")
    reader = None
    try:
        reader = GGUFReader(src)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
                or k.rsplit(".", 1)[-1] not in ("tokens", "scores", "token_type", "merges")}
        meta["tokenizer.ggml.tokens.count"] = len(reader.fields["tokenizer.ggml.tokens"].data) \
            if "tokenizer.ggml.tokens" in reader.fields else 0
        raw = [(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.data_offset),
                int(t.n_bytes)) for t in reader.tensors]
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
        raise GGUFError(f"{src} is truncated or corrupt ({type(e).__name__}: {e}); re-copy or re-download it") \
            from None
    finally:
        del reader  # its memory map: tensors are read with plain reads, one at a time
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{src.name}: GGUF architecture {arch!r} is not supported (supported: "
                           f"{', '.join(ARCHITECTURES)})")
    size = src.stat().st_size
    tensors = []
    for name, type_name, shape, offset, nbytes in raw:
        if type_name not in TYPES:
            raise GGUFError(f"{src.name}: tensor {name} is of GGML type {type_name}, which the import does not "
                               f"dequantize (supported: {', '.join(TYPES)})")
        if offset + nbytes > size:
            raise GGUFError(f"{src} is truncated: tensor {name} ends at byte {offset + nbytes}, the file has "
                               f"{size}; re-copy or re-download it")
        if name == "rope_freqs.weight":
            raise GGUFError(f"{src.name}: per-frequency rope factors (rope_freqs, Llama 3.1's scaling) are not "
                               "supported by the import")
        tensors.append(_Tensor(name, _hf_name(src, name), type_name, shape, offset, nbytes))
    return meta, tensors


def hf_config(meta: dict, tensors: list[_Tensor], dtype: str) -> dict:
    """A transformers config.json from the GGUF metadata (the keys llama.cpp's converter writes)."""
    arch = meta["general.architecture"]
    key = lambda name, default=None: meta.get(f"{arch}.{name}", default)
    try:
        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        names = {t.hf_name for t in tensors}
        model_type = "mistral" if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower() else arch
        config = {
            "architectures": ["MistralForCausalLM" if model_type == "mistral" else ARCHITECTURES[arch]],
            "model_type": model_type, "hidden_size": hidden, "num_attention_heads": heads,
            "num_hidden_layers": int(key("block_count")), "intermediate_size": int(key("feed_forward_length")),
            "num_key_value_heads": int(key("attention.head_count_kv", heads)),
            "head_dim": int(key("attention.key_length", hidden // heads)),
            "max_position_embeddings": int(key("context_length")),
            "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(key("rope.freq_base", 10000.0)),
            "vocab_size": int(meta["tokenizer.ggml.tokens.count"] or key("vocab_size")),
            "tie_word_embeddings": "lm_head.weight" not in names, "hidden_act": "silu", "torch_dtype": dtype,
            "attention_bias": arch == "llama" and "model.layers.0.self_attn.q_proj.bias" in names,
        }
    except (TypeError, ValueError) as e:
        raise GGUFError(f"the GGUF metadata lacks what a {arch} config needs ({e})") from None
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"GGUF rope scaling {scaling!r} is not supported by the import (supported: linear)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    for name in ("bos", "eos", "padding"):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(value)
    return config


def _hf_name(src: Path, name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    key, layer = (m.group(2), m.group(1)) if m else (name, None)
    hf = _TENSORS.get(key)
    if hf is None or ("{}" in hf) != (layer is not None):
        raise GGUFError(f"{src.name}: tensor {name} has no place in a Llama-family model")
    return hf.format(layer)


def _values(f, t: _Tensor, config: dict) -> torch.Tensor:
    """One tensor, read with a positional read and dequantized to fp32 (rows first); q and k un-permuted."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = np.empty(t.nbytes, dtype=np.uint8)
    f.seek(t.offset)
    if f.readinto(memoryview(raw)) != t.nbytes:
        raise GGUFError(f"{f.name}: short read of tensor {t.gguf_name}; the file is truncated")
    qtype = GGMLQuantizationType[t.type_name]
    if t.type_name in ("F32", "F16"):
        values = raw.view(np.float32 if t.type_name == "F32" else np.float16).astype(np.float32)
    else:
        values = dequantize(raw.reshape(t.shape[0] if len(t.shape) > 1 else 1, -1), qtype)
    out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(t.shape)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    kind = t.hf_name.split(".")[-2]
    if config["model_type"] in ("llama", "mistral") and kind in heads:
        out = _unpermute(out, heads[kind])
    return out


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: within each head, rows (pairs of adjacent rotary values) back to halves.
    w (heads * d, ...) -> the same shape."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tokenizer(src: Path, out: Path) -> None:
    """The GGUF's vocabulary as HF tokenizer files, converted by transformers' own GGUF loading."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as e:  # transformers raises several types for a vocabulary it cannot convert
        raise GGUFError(f"{src.name}: transformers cannot convert its tokenizer ({e})") from None
    finally:
        logging.set_verbosity(verbosity)
    tokenizer.save_pretrained(out)


def fingerprint(src: Path) -> dict:
    """What identifies a GGUF file's content for an import made of it: name, size, mtime."""
    st = src.stat()
    return {"name": src.name, "size": st.st_size, "mtime": int(st.st_mtime)}
