"""The head of a scoring pass (`Engine.score`, `score_rolling`): log-probs of each item's continuation.

A scoring block is right-padded (`Engine._score_items`): each row's tokens start at column 0, so plain causal
attention is exact for them without a mask, and the fused attention kernel skips the upper triangle. With a
mask (left padding) it computes every (query, key) pair of the padded square: measured 2.5x slower at 4096
tokens, where long windows (WikiText's 8192) spend most of their time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from runtime.layers import StepContext

_LOGIT_CHUNK = 64 * 2**20
"""Logit elements materialized at once (256 MiB of fp32): the whole (positions, vocab) of a long window would not
fit."""


class ScoringHead:
    """Runs in the head's place in the block schedule: gathers only the positions whose logits predict a
    continuation token (across the micro-batch's rows, `_LOGIT_CHUNK` logits at a time), applies the head to them
    and keeps each continuation token's log-prob and whether greedy decoding would have produced it."""

    def __init__(self, head, vocab_size: int, continuations: list, per_token: list[list[float]],
                 greedy: list[bool]) -> None:
        self.head, self.vocab_size = head, vocab_size
        self.continuations, self.per_token, self.greedy = continuations, per_token, greedy

    def forward(self, w, h: torch.Tensor, ctx: StepContext, cache=None) -> torch.Tensor:
        """h (b, T, hidden); `ctx.score`: per row, (item, end column): the item's inputs end before `end`, so
        columns [end - len(continuation), end) predict its continuation. -> nothing to carry on: (b, 0)."""
        spans = [(r, i, end - len(self.continuations[i]), end) for r, (i, end) in enumerate(ctx.score)]
        step = StepContext(ctx.positions, None, 0, None, ctx.dtype)
        for piece in _pieces(spans, max(1, _LOGIT_CHUNK // self.vocab_size)):
            x = torch.cat([h[r, a:b] for r, _, a, b, _ in piece])[None]  # (1, t, hidden)
            lp = torch.log_softmax(self.head.forward(w, x, step, None).float(), -1)[0]  # (t, V)
            targets = torch.as_tensor([tok for _, i, a, b, off in piece
                                       for tok in self.continuations[i][off:off + b - a]], device=lp.device)
            got = lp.gather(-1, targets[:, None])[:, 0].tolist()  # (t,)
            hit = (lp.argmax(-1) == targets).tolist()
            o = 0
            for _, i, a, b, off in piece:
                n = b - a
                self.per_token[i].extend(got[o:o + n])
                self.greedy[i] = (off == 0 or self.greedy[i]) and all(hit[o:o + n])
                o += n
        return h.new_empty(h.shape[0], 0)


def _pieces(spans: list, size: int) -> Iterator[list]:
    """Spans (row, item, first, end) cut into pieces of at most `size` columns in all, in order; each part as
    (row, item, first, end, offset of `first` in the item's continuation)."""
    piece, used = [], 0
    for r, i, a, b in spans:
        start = a
        while start < b:
            take = min(b - start, size - used)
            piece.append((r, i, start, start + take, start - a))
            used, start = used + take, start + take
            if used == size:
                yield piece
                piece, used = [], 0
    if piece:
        yield piece
