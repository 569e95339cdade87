"""What engine calls return: plain Python values (ids, floats) plus timings and peak memory."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CallStats:
    """Timing and memory of one engine call."""

    prefill_s: float
    """Seconds in prefill (prompt processing) forward passes."""
    decode_s: float
    """Seconds in decode steps (sampling included)."""
    prompt_tokens: int
    """Prompt tokens processed (padding excluded)."""
    generated_tokens: int
    """Tokens generated, each sequence counted up to and including the token that finished it."""
    peak_memory: dict[str, int] = field(default_factory=dict)
    """Peak bytes per tier during the call (`host`: peak RSS; `device`: CUDA allocations; `disk`: weights stored
    on disk plus the blocks the KV cache and activation scratch files occupied, measured while they existed)."""
    planned_memory: dict[str, int] = field(default_factory=dict)
    """Bytes the policy placed on each tier: weights plus the largest KV cache (on a CPU host, device = RAM)."""
    shared_prefix_tokens: int = 0
    """Prompt tokens computed once for a whole block instead of once per row: each block's shared prefix (a
    few-shot prompt's examples) times its rows but one. Counted in `prompt_tokens` all the same."""

    @property
    def throughput(self) -> float:
        """Generated tokens per second of prefill + decode (FlexGen's definition)."""
        total = self.prefill_s + self.decode_s
        return self.generated_tokens / total if total > 0 else 0.0

    def to_json(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "throughput_tok_s": self.throughput,
                "peak_memory": dict(self.peak_memory), "planned_memory": dict(self.planned_memory),
                "shared_prefix_tokens": self.shared_prefix_tokens}


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation. A matched stop sequence or EOS is not part of `output_ids`."""

    output_ids: list[int]
    logprobs: list[float]
    """Log-probability of each output token under the model (temperature 1, no top-k/p filter)."""
    finish_reason: str
    """`length` (max_new_tokens reached), `stop` (a stop sequence matched) or `eos`."""


@dataclass(frozen=True)
class GenerateResult:
    generations: list[Generation]
    stats: CallStats


@dataclass(frozen=True)
class Score:
    """Log-likelihood of one continuation given its context."""

    logprob: float
    """Sum of the continuation tokens' log-probabilities."""
    is_greedy: bool
    """Whether greedy decoding from the context produces exactly the continuation."""
    token_logprobs: list[float]


@dataclass(frozen=True)
class ScoreResult:
    scores: list[Score]
    stats: CallStats


@dataclass(frozen=True)
class RollingResult:
    token_logprobs: list[list[float]]
    """Per stream, the log-probability of each scored token (all tokens with a prefix token, else all but the first)."""
    stats: CallStats
