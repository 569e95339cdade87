"""Rotary position embeddings (RoPE) with HF's scaling types: `default`, `linear`, `dynamic` (NTK) and `llama3`.

The engine computes (cos, sin) once per step and micro-batch from the tokens' positions (`StepContext.rotary`);
every decoder layer applies them to its queries and keys. Frequencies and angles are computed in fp32 exactly as
HF's `LlamaRotaryEmbedding` does (inverse frequencies from `arange(0, d, 2) / d`, angle = position * frequency),
then cast to the compute dtype.

`dynamic`: HF grows the base once the sequence outgrows the pre-training context, from the length at the step
being computed (max position + 1), and keeps the keys already cached as they were rotated. Here that length is
taken per row, so a row gets the frequencies it would get alone: batching never changes its results.
"""

from __future__ import annotations

import math

import torch

from runtime.spec import RopeSpec


class Rotary:
    """cos/sin tables of one model's rotary scheme."""

    def __init__(self, rope: RopeSpec, head_dim: int, device: torch.device) -> None:
        self.rope, self.dim, self.device = rope, head_dim, device
        self.inv_freq = _inv_freq(rope.theta, head_dim, device)  # (d/2,)
        if rope.type == "linear":
            self.inv_freq = self.inv_freq / rope.factor
        elif rope.type == "llama3":
            self.inv_freq = _llama3(self.inv_freq, rope)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) long -> (cos, sin), each (B, 1, T, d) in `dtype`."""
        inv = self.inv_freq[None, None, :]  # (1, 1, d/2)
        if self.rope.type == "dynamic":
            inv = self._dynamic(positions)[:, None, :]  # (B, 1, d/2)
        freqs = positions.to(torch.float32)[..., None] * inv  # (B, T, d/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, d)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _dynamic(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, d/2) inverse frequencies for each row's length (its last position + 1), HF's NTK-aware rule."""
        original = self.rope.original_max_positions
        seq_len = (positions.max(dim=-1).values + 1).clamp(min=original).to(torch.float32)  # (B,)
        factor, d = self.rope.factor, self.dim
        base = self.rope.theta * ((factor * seq_len / original) - (factor - 1)) ** (d / (d - 2))  # (B,)
        exponents = torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).to(torch.float32) / d
        return 1.0 / (base[:, None] ** exponents[None, :])


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d) rotated: x * cos + rotate_half(x) * sin (the halves convention of HF checkpoints).

    Computed a half at a time into x * cos, the same roundings as HF's `torch.cat((-x2, x1)) * sin` sum (equal
    bits) without the rotated copy: 1.7 ms against 4.5 on (4, 9, 1024, 64) fp32 here."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos  # (B, H, T, d)
    out[..., :half] -= x2 * sin[..., :half]
    out[..., half:] += x1 * sin[..., half:]
    return out


def _inv_freq(theta: float, dim: int, device: torch.device) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (theta ** exponents)


def _llama3(inv_freq: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, smoothed in between."""
    old, factor = rope.original_max_positions, rope.factor
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
