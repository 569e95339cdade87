"""Length bucketing, left padding, shared prefixes, positions and attention masks.

Prompts are sorted by length and cut into blocks, so each block pads only to its own longest prompt.
Left padding keeps every row's newest token in the last column, which lets a whole block decode with
one cache index. Pads are masked out of attention, so results never depend on padding. A prefix that
every row of a block shares (a few-shot prompt's examples) stays in the first columns, the pads go
after it, so the engine can compute its keys and values once for the whole block.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from runtime.errors import InputError


def plan_blocks(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    """Indices grouped into blocks of at most `block_size`, longest first (stable for equal lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + block_size] for i in range(0, len(order), block_size)]


def split(rows: Sequence[int], size: int) -> list[slice]:
    """Micro-batch slices of `size` rows over a block of `len(rows)` rows."""
    return [slice(i, min(i + size, len(rows))) for i in range(0, len(rows), size)]


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one of its own; 0 for one row."""
    if len(seqs) < 2:
        return 0
    # lists compare element-wise, so the common prefix of all is that of the smallest and the largest
    return min(len(os.path.commonprefix([list(s) for s in seqs])), min(map(len, seqs)) - 1)


def pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device,
        left: bool = True, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) padded with `pad_id` on the left (generation: every row's newest token in the last column)
    or the right (scoring), and the validity mask (B, T) bool. With `prefix` (left only), each row's first
    `prefix` tokens (the same in every row) fill columns [0, prefix) and the pads sit between them and the rest."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for r, s in enumerate(seqs):
        if s:
            cols = slice(T - len(s) + prefix, T) if left else slice(0, len(s))
            ids[r, cols] = torch.as_tensor(s[prefix:] if left else s, dtype=torch.long)
            valid[r, cols] = True
    if prefix:
        ids[:, :prefix] = torch.as_tensor(seqs[0][:prefix], dtype=torch.long)
        valid[:, :prefix] = True
    return ids.to(device), valid.to(device)


def positions(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token counted over valid tokens only; pads get -1 (as HF OPT does)."""
    return (valid.long().cumsum(-1) * valid.long() - 1).long()


def prefill_mask(valid: torch.Tensor, window: int | None = None, explicit: bool = False) -> torch.Tensor | None:
    """(B, 1, T, T) causal mask that hides pads and, with a sliding `window`, keys `window` or more positions
    behind the query (HF: key j visible from query i when i - window < j <= i); None when it would be plain causal,
    unless `explicit` (a step whose queries are only the last rows). Left padding keeps each row's tokens in
    consecutive columns, so column distance is position distance (a shared prefix's pads break that: the engine
    shares no prefix under a window)."""
    T = valid.shape[1]
    windowed = window is not None and T > window
    if bool(valid.all()) and not windowed and not explicit:
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    if windowed:
        causal = causal.triu(1 - window)
    mask = causal[None] & valid[:, None, :]  # (B, T, T)
    # A pad row would attend to nothing (softmax of all -inf = NaN); let it see itself. Its output is
    # never read and real rows never attend to pads, so this changes no result.
    mask |= torch.eye(T, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


def decode_mask(valid: torch.Tensor, window: int | None = None) -> torch.Tensor | None:
    """(B, 1, 1, S) mask of the newest token (column S - 1) over the cache's columns `valid` (B, S): pads hidden and,
    with a sliding `window`, columns before S - window; None when it would see everything."""
    S = valid.shape[1]
    if window is not None and S > window:
        valid = valid.clone()
        valid[:, :S - window] = False
    elif bool(valid.all()):
        return None
    return valid[:, None, None, :]


def validate_ids(seqs: Sequence[Sequence[int]], what: str, vocab_size: int) -> None:
    if not isinstance(seqs, Sequence) or isinstance(seqs, str) or len(seqs) == 0:
        raise InputError(f"{what}: expected a non-empty list of token id lists, got {type(seqs).__name__} "
                         f"of length {len(seqs) if hasattr(seqs, '__len__') else '?'}")
    for i, s in enumerate(seqs):
        if isinstance(s, str) or not all(isinstance(t, int) for t in s):
            raise InputError(f"{what}[{i}] must be a list of int token ids (tokenize text first)")
        if len(s) == 0:
            raise InputError(f"{what}[{i}] is empty: every prompt needs at least one token")
        bad = [t for t in s if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"{what}[{i}] holds token id {bad[0]} outside the vocabulary [0, {vocab_size})")
