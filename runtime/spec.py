"""`ModelSpec`: the family-independent shape of a decoder-only transformer, read from `config.json`; and
`WeightSpec`, one weight of a layer. Both torch-free: planning and HELM registration read configs of models
they never load."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import CheckpointError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
"""Rotary scaling schemes the runtime computes (HF `rope_type` names)."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embeddings (HF `rope_parameters`, formerly `rope_theta` + `rope_scaling`)."""

    theta: float = 10000.0
    """Base of the frequencies."""
    type: str = "default"
    """One of `ROPE_TYPES`."""
    factor: float = 1.0
    """Scaling factor (`linear`, `dynamic`, `llama3`)."""
    low_freq_factor: float = 1.0
    """`llama3`: wavelengths above original_max_positions / low_freq_factor are divided by `factor`."""
    high_freq_factor: float = 4.0
    """`llama3`: wavelengths below original_max_positions / high_freq_factor are kept."""
    original_max_positions: int = 0
    """`llama3`: the pre-training context; `dynamic`: the length beyond which the base grows (0: max_positions)."""

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if not self.theta > 0 or not self.factor > 0:
            raise ValueError(f"rope theta ({self.theta}) and factor ({self.factor}) must be > 0")


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a model; derived once from the checkpoint's config."""

    family: str
    """Model family module that owns the math (`opt`, `llama`)."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Attention (query) heads."""
    num_kv_heads: int
    """Key/value heads (== num_heads without grouped-query attention, 1 for multi-query attention)."""
    head_dim: int
    """Width of one head (configs may give one that is not hidden_size / num_heads)."""
    ffn_size: int
    """Inner width of the MLP."""
    vocab_size: int
    """Rows of the token embedding."""
    max_positions: int
    """Longest sequence (prompt + generated tokens) the positional scheme supports."""
    embed_dim: int
    """Width of the token embedding (OPT-350m: 512 != hidden 1024, with project_in/out)."""
    norm: str
    """`layernorm` (OPT) or `rmsnorm` (Llama family)."""
    norm_before: bool
    """Pre-norm (True) or post-norm (False, OPT-350m)."""
    final_norm: bool
    """Whether a final norm follows the last layer."""
    norm_affine: bool
    """Whether norms carry a weight (and, for layer norms, a bias)."""
    norm_eps: float
    """Epsilon of the norms."""
    activation: str
    """MLP activation (`relu`, `gelu`, `silu`, ...)."""
    gated_mlp: bool
    """act(gate(x)) * up(x) -> down (SwiGLU, Llama family), else fc2(act(fc1(x))) (OPT)."""
    positional: str
    """`learned` (OPT's table) or `rotary`."""
    position_offset: int
    """Index offset into the learned position table (OPT: 2)."""
    rope: RopeSpec | None
    """Rotary parameters when `positional` is `rotary`."""
    sliding_window: int | None
    """Keys older than this many positions are not attended to (Mistral); None: full attention."""
    qkv_bias: bool
    """Whether the q, k, v projections carry biases (OPT, Qwen2)."""
    out_bias: bool
    """Whether the attention output projection carries a bias."""
    mlp_bias: bool
    """Whether the MLP projections carry biases."""
    tied_embeddings: bool
    """Whether the output head reuses the token embedding."""
    bos_token_id: int | None
    """Beginning-of-sequence token, if any."""
    eos_token_ids: tuple[int, ...]
    """End-of-sequence tokens: generation stops at any of them (Llama 3 lists several)."""
    pad_token_id: int | None
    """Padding token, if any."""
    torch_dtype: str
    """Storage dtype named by the config (`float16`, `bfloat16`, `float32`)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "vocab_size",
                     "max_positions", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.positional == "rotary" and (self.rope is None or self.head_dim % 2):
            raise ValueError("rotary positions need rope parameters and an even head_dim")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm {self.norm!r} is not layernorm or rmsnorm")

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence token (what starts a text with no prompt, as GPT-2 does)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def q_size(self) -> int:
        """Width of all query heads together."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (or value) heads together: what one token adds to one layer's cache, per kind."""
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (a tied head counted once), summed over the family's weights (`runtime.shapes`)."""
        from runtime.shapes import num_parameters

        return num_parameters(self)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WeightSpec:
    """One compute-ready weight of a layer, built from one or more checkpoint tensors."""

    key: str
    """Name inside the layer (`qkv.weight`)."""
    shape: tuple[int, ...]
    """Shape after concatenation."""
    sources: tuple[str, ...]
    """Checkpoint tensor names, concatenated along dim 0 (fused q/k/v) in this order."""
    lookup: bool = False
    """A table the layer only indexes (embeddings): fetched in its stored dtype, the layer casts the rows it
    takes, so a 50k x h table is never converted whole."""
    in_memory: bool = False
    """Never placed on disk (a disk placement keeps it in RAM): the embedding tables and the head, which a
    step needs whole. Staged from disk, such a weight would take a buffer of its own size anyway, and a
    read per step: on opt-1.3b the tied 206 MB table was read twice a step, into both staging slots."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        """A weight that a matmul multiplies (lookup tables are indexed, not multiplied, except by a tied head)."""
        return len(self.shape) == 2 and not self.lookup


@dataclass(frozen=True)
class LayerShape:
    """One layer of a family's layout: what `runtime.layers.Layer`s are built from, and what the cost model,
    the roofline and the weight placement count."""

    name: str
    """`embedding`, `layer{i}` or `head`."""
    kind: str
    """`embedding`, `decoder` or `head`."""
    weights: tuple[WeightSpec, ...]


def eos_ids(value) -> tuple[int, ...]:
    """A config's `eos_token_id` (an int, a list of ints, or null) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise CheckpointError(f"config.json: eos_token_id must be an integer or a list of them, got {value!r}")
    values = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"config.json: eos_token_id must be an integer or a list of them, got {value!r}")
    return tuple(dict.fromkeys(values))


def read_config(path: Path) -> dict:
    """A checkpoint folder's config.json (no torch needed: planning and HELM registration read it too). The EOS
    tokens of `generation_config.json`, which HF `generate` stops at, join the config's own."""
    cfg = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist; pass --model a local folder "
                              "holding config.json, weights and tokenizer files")
    if not cfg.is_file():
        raise CheckpointError(f"{cfg} is missing: a model folder needs the config.json that "
                              "save_pretrained writes beside the weights")
    config = _json(cfg)
    gen = path / "generation_config.json"
    if gen.is_file() and gen.stat().st_size:
        extra = eos_ids(_json(gen).get("eos_token_id"))
        if extra:
            config["eos_token_id"] = list(eos_ids(config.get("eos_token_id")) + extra)
    return config


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); restore it from the original checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object; restore it from the original checkpoint")
    return data
