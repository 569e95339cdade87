"""Benchmark models: random weights in the real OPT architectures, built locally once and cached.

Throughput does not depend on weight values, so a random model of the right shape stands in for the
real checkpoint without any download. Models live under `$FLEXHELM_CACHE/bench-models/<name>/`
(default `~/.cache/flexhelm`), stored fp16 as the real OPT checkpoints are.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Arch:
    """The shape of an OPT model (pre-LN, tied head, learned positions: every OPT size but 350m)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int = 50272
    max_positions: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


ARCHS = {
    "opt-125m": Arch(768, 12, 12, 3072),
    "opt-1.3b": Arch(2048, 24, 32, 8192),
    "opt-2.7b": Arch(2560, 32, 32, 10240),
    "opt-6.7b": Arch(4096, 32, 32, 16384),
    # For smoke tests only (`quick=True`): builds and runs in well under a second.
    "opt-tiny": Arch(64, 2, 4, 256),
}


def cache_root() -> Path:
    return Path(os.environ.get("FLEXHELM_CACHE") or Path.home() / ".cache" / "flexhelm")


def model_dir(name: str) -> Path:
    return cache_root() / "bench-models" / name


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


def _build(arch: Arch, out: Path) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=arch.hidden, num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                       ffn_dim=arch.ffn, vocab_size=arch.vocab, max_position_embeddings=arch.max_positions,
                       word_embed_proj_dim=arch.hidden)
    torch.manual_seed(0)
    # Construct directly in fp16: building in fp32 first would hold twice the fp16 size (opt-6.7b:
    # 27 GB, more than this machine's RAM). Random weights do not need fp32 initialization.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # transformers 5 always writes safetensors (4.x did by default): no `safe_serialization` argument,
    # which 5.x no longer names.
    model.to(torch.float16).save_pretrained(out)
