"""`ModelSpec`: the family-independent shape of a decoder-only transformer, read from `config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import CheckpointError


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a model; derived once from the checkpoint's config."""

    family: str
    """Model family module that owns the math (`opt`, ...)."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Attention (query) heads."""
    num_kv_heads: int
    """Key/value heads (== num_heads without grouped-query attention)."""
    ffn_size: int
    """Inner width of the MLP."""
    vocab_size: int
    """Rows of the token embedding."""
    max_positions: int
    """Longest sequence (prompt + generated tokens) the positional scheme supports."""
    embed_dim: int
    """Width of the token embedding (OPT-350m: 512 != hidden 1024, with project_in/out)."""
    norm_before: bool
    """Pre-LN (True) or post-LN (False, OPT-350m)."""
    final_norm: bool
    """Whether a final norm follows the last layer."""
    norm_affine: bool
    """Whether norms carry a weight and bias."""
    norm_eps: float
    """Epsilon of the norms."""
    activation: str
    """MLP activation (`relu`, `gelu`, ...)."""
    positional: str
    """Positional scheme (`learned` for OPT)."""
    position_offset: int
    """Index offset into the learned position table (OPT: 2)."""
    bias: bool
    """Whether linear layers carry biases."""
    tied_embeddings: bool
    """Whether the output head reuses the token embedding."""
    bos_token_id: int | None
    """Beginning-of-sequence token, if any."""
    eos_token_id: int | None
    """End-of-sequence token, if any."""
    pad_token_id: int | None
    """Padding token, if any."""
    torch_dtype: str
    """Storage dtype named by the config (`float16`, `float32`, ...)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "vocab_size",
                     "max_positions", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self) -> int:
        """Parameter count (biases and norms included; a tied head counted once)."""
        h, f, e = self.hidden_size, self.ffn_size, self.embed_dim
        kv = self.num_kv_heads * self.head_dim
        b = 1 if self.bias else 0
        attn = h * (h + 2 * kv) + (h + 2 * kv) * b + h * h + h * b
        mlp = 2 * h * f + (f + h) * b
        norms = 4 * h if self.norm_affine else 0
        layer = attn + mlp + norms
        embed = self.vocab_size * e + (self.max_positions + self.position_offset) * h
        proj = 2 * e * h if e != h else 0
        head = 0 if self.tied_embeddings else self.vocab_size * e
        final = 2 * h if (self.final_norm and self.norm_affine) else 0
        return self.num_layers * layer + embed + proj + head + final

    def to_json(self) -> dict:
        return asdict(self)


def read_config(path: Path) -> dict:
    """A checkpoint folder's config.json (no torch needed: planning and HELM registration read it too)."""
    cfg = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist; pass --model a local folder "
                              "holding config.json, weights and tokenizer files")
    if not cfg.is_file():
        raise CheckpointError(f"{cfg} is missing: a model folder needs the config.json that "
                              "save_pretrained writes beside the weights")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e}); restore it from the original checkpoint") from None
