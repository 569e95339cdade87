"""Next-token choice (greedy, temperature, top-k, top-p) and stop conditions.

Each row draws from its own generator, seeded by (seed, row's index in the call), so a sample never
depends on which other prompts share its batch. Sampling uses the Gumbel-max trick over the filtered
logits, which draws exactly from softmax(logits / temperature) restricted to the kept tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from runtime.errors import InputError


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


class Sampler:
    """Chooses one token per row from (B, V) logits and returns it with its log-probability."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int, rows: Sequence[int]) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generators = []
        if temperature > 0:
            for r in rows:
                g = torch.Generator()
                g.manual_seed((seed * 1_000_003 + r) % (2**63))
                self.generators.append(g)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()  # (B, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        if self.temperature == 0:
            tokens = logits.argmax(dim=-1)
        else:
            scores = self._filter(logits / self.temperature)
            noise = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in self.generators])
            gumbel = -torch.log(-torch.log(noise.clamp_(min=1e-20)))
            tokens = (scores + gumbel.to(scores.device)).argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]

    def _filter(self, scores: torch.Tensor) -> torch.Tensor:
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1:
            sorted_scores, idx = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p (the best always stays)
            drop = probs.cumsum(dim=-1) - probs >= self.top_p
            scores = scores.scatter(-1, idx, sorted_scores.masked_fill(drop, float("-inf")))
        return scores


class StopChecker:
    """Tracks one row's output and whether it ended (any EOS token or stop sequence, of any length)."""

    def __init__(self, stop_sequences: Sequence[Sequence[int]], eos_token_ids: Collection[int] = ()) -> None:
        self.stops = [list(s) for s in stop_sequences if len(s) > 0]
        self.eos = frozenset(eos_token_ids)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.reason: str | None = None
        self.emitted = 0
        """Tokens the model produced for this row, the stop sequence or EOS it ended on included."""

    def push(self, token: int, logprob: float) -> bool:
        """Append a token; True when the row has just finished."""
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.emitted += 1
        if token in self.eos:
            self._finish("eos", 1)
            return True
        for s in self.stops:
            if len(self.ids) >= len(s) and self.ids[-len(s):] == s:
                self._finish("stop", len(s))
                return True
        return False

    def _finish(self, reason: str, drop: int) -> None:
        self.reason = reason
        del self.ids[-drop:], self.logprobs[-drop:]
