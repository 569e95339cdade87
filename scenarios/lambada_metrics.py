"""LAMBADA metrics: greedy accuracy and target log-likelihood from HELM's (text, logprob) tokens.

lm-evaluation-harness scores LAMBADA teacher-forced: feed context + target tokens once and check that
every target token is the argmax (accuracy), summing the target tokens' log-probs (log-likelihood).
HELM's `Token` carries only (text, logprob), no top-k, so the two are measured by two run specs
(`scenarios.run_specs.lambada_run_spec`, `method=`):

- `greedy` (HELM `generation` adapter, temperature 0): `LambadaAccuracyMetric`. The instance is correct
  iff the shortest prefix of the generated tokens whose joint text is at least as long as " " + target
  spells exactly " " + target (a token boundary right after the word; what follows does not matter).
  Greedy decoding emits the argmax at every step, so when the model's greedy tokens for the word are its
  canonical tokenization of " " + target (the one lm-eval's teacher forcing uses), this equals lm-eval's
  check; it can differ only if greedy spells the word with a non-canonical split (counted correct here).
- `likelihood` (HELM `multiple_choice_separate_original` adapter with the target as the one reference
  and `output_prefix=" "`: one echo request, max_tokens=0, over context + " " + target):
  `LambadaLikelihoodMetric`. It reads the log-probs of the returned prompt tokens that cover the last
  len(" " + target) characters, i.e. the shortest suffix of tokens whose joint text is at least that long.
  When a token straddles the context/target boundary it is counted with the target (`target_aligned` = 0
  flags this; with GPT-2-style BPE the leading space starts the word's first token, so it is rare).

A passage longer than the model's window is cut from the right by HELM's adapters (lm-evaluation-harness
cuts the context from the left instead). Both metrics leave such a passage out and it shows as
`prompt_truncated` (HELM's basic metric for `greedy`, ours for `likelihood`). The longest passage is 224
GPT-2/OPT tokens, so none is cut for real models.

Texts are compared as UTF-8 bytes; a token in HELM's byte notation (`bytes:\\xe2\\x80`) counts as those
bytes, so a word split inside a multi-byte character still matches.
"""

from __future__ import annotations

import math
from dataclasses import replace

from helm.benchmark.adaptation.adapter_spec import AdapterSpec
from helm.benchmark.adaptation.request_state import RequestState
from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.metrics.metric import Metric, MetricMetadata, MetricResult
from helm.benchmark.metrics.metric_name import MetricName
from helm.benchmark.metrics.metric_service import MetricService
from helm.benchmark.metrics.reference_metric import ReferenceMetric
from helm.benchmark.metrics.statistic import Stat
from helm.common.request import Token

BYTE_TOKEN_PREFIX = "bytes:"


def token_bytes(token: Token) -> bytes:
    """The UTF-8 bytes a token stands for (HELM's `bytes:\\xNN...` notation or plain text)."""
    text = token.text
    if text.startswith(BYTE_TOKEN_PREFIX):
        return bytes(int(h, 16) for h in text[len(BYTE_TOKEN_PREFIX) :].split("\\x")[1:])
    return text.encode("utf-8")


def spells_at_token_boundary(tokens: list[Token], goal: str) -> bool:
    """True iff the shortest prefix of `tokens` at least as long as `goal` spells exactly `goal`."""
    want = goal.encode("utf-8")
    have = b""
    for token in tokens:
        have += token_bytes(token)
        if len(have) >= len(want):
            return have == want
    return False  # the generation stopped before covering the word


def covering_suffix(tokens: list[Token], goal: str) -> tuple[list[Token], bool]:
    """(the shortest suffix of `tokens` covering the last len(goal) bytes, whether it is exactly `goal`)."""
    want = goal.encode("utf-8")
    have = b""
    for start in range(len(tokens) - 1, -1, -1):
        have = token_bytes(tokens[start]) + have
        if len(have) >= len(want):
            return tokens[start:], have == want
    raise ValueError(f"the echoed prompt ({len(have)} bytes) is shorter than the target {goal!r}")


def _target(request_state: RequestState) -> str:
    reference = request_state.instance.first_correct_reference
    if reference is None:
        raise ValueError(f"LAMBADA instance {request_state.instance.id} has no correct reference")
    return reference.output.text


class LambadaAccuracyMetric(Metric):
    """`lambada_accuracy`: greedy generation continues the context with exactly " " + target (module doc)."""

    def __repr__(self) -> str:
        return "LambadaAccuracyMetric()"

    def evaluate_generation(
        self,
        adapter_spec: AdapterSpec,
        request_state: RequestState,
        metric_service: MetricService,
        eval_cache_path: str,
    ) -> list[Stat]:
        assert request_state.result is not None
        if request_state.prompt_truncated:
            return []  # context cut from the right to fit the window: not this passage (module docstring)
        completion = request_state.result.completions[0]
        if completion.text and not completion.tokens:
            # Without tokens the boundary check is impossible; a silent 0 would look like a bad model.
            raise ValueError("lambada_accuracy needs the generated tokens; the client returned text only")
        correct = spells_at_token_boundary(list(completion.tokens), " " + _target(request_state))
        return [Stat(MetricName("lambada_accuracy")).add(float(correct))]

    def get_metadata(self) -> list[MetricMetadata]:
        return [
            MetricMetadata(
                name="lambada_accuracy",
                display_name="LAMBADA accuracy",
                short_display_name="Acc",
                description="Greedy continuation spells exactly ' ' + last word at a token boundary "
                "(lm-evaluation-harness's teacher-forced greedy check for a canonical tokenization).",
                lower_is_better=False,
            )
        ]


class LambadaLikelihoodMetric(ReferenceMetric):
    """Target log-likelihood from an echoed context + " " + target (module doc).

    Per instance: `target_logprob` (sum over the covering tokens), `target_logprob_per_token`,
    `num_target_tokens`, `target_aligned`, `prompt_truncated`. Per run additionally `target_perplexity` =
    exp(-mean target_logprob), lm-evaluation-harness's LAMBADA perplexity. A passage longer than the
    model's window is cut from the right by HELM's adapter, target included (lm-evaluation-harness cuts
    the context from the left): it gets `prompt_truncated` = 1 and no target stats, so the means are over
    the passages that fit (all of them for real models: the longest is 224 GPT-2/OPT tokens).
    """

    def __repr__(self) -> str:
        return "LambadaLikelihoodMetric()"

    def evaluate_references(
        self,
        adapter_spec: AdapterSpec,
        reference_request_states: list[RequestState],
        metric_service: MetricService,
        eval_cache_path: str,
    ) -> list[Stat]:
        (request_state,) = reference_request_states  # one reference: the target
        assert request_state.result is not None
        # The prompt ends with output_prefix + target + output_suffix (" " + target for our run spec) unless
        # HELM cut it from the right to fit the model's window: then the target is gone and nothing is scored.
        goal = adapter_spec.output_prefix + _target(request_state) + adapter_spec.output_suffix
        truncated = request_state.prompt_truncated or not request_state.request.prompt.endswith(goal)
        if truncated:
            return [Stat(MetricName("prompt_truncated")).add(1.0)]
        tokens, aligned = covering_suffix(list(request_state.result.completions[0].tokens), goal)
        logprob = sum(token.logprob for token in tokens)
        if math.isnan(logprob):
            raise ValueError(f"NaN log-prob for instance {request_state.instance.id}")
        return [
            Stat(MetricName("target_logprob")).add(logprob),
            Stat(MetricName("target_logprob_per_token")).add(logprob / len(tokens)),
            Stat(MetricName("num_target_tokens")).add(len(tokens)),
            Stat(MetricName("target_aligned")).add(float(aligned)),
            Stat(MetricName("prompt_truncated")).add(0.0),
        ]

    def evaluate(
        self, scenario_state: ScenarioState, metric_service: MetricService, eval_cache_path: str, parallelism: int
    ) -> MetricResult:
        result = super().evaluate(scenario_state, metric_service, eval_cache_path, parallelism)
        # Aggregated stats hold the mean over instances per context (split, perturbation).
        perplexities = [
            Stat(replace(stat.name, name="target_perplexity")).add(math.exp(-stat.mean))
            for stat in result.aggregated_stats
            if stat.name.name == "target_logprob" and stat.count > 0
        ]
        return MetricResult(result.aggregated_stats + perplexities, result.per_instance_stats)

    def get_metadata(self) -> list[MetricMetadata]:
        return [
            MetricMetadata(
                name="target_logprob",
                display_name="Target log-likelihood",
                description="Sum of log-probs of the tokens covering ' ' + last word.",
                lower_is_better=False,
            ),
            MetricMetadata(
                name="target_logprob_per_token",
                display_name="Target log-likelihood per token",
                lower_is_better=False,
            ),
            MetricMetadata(name="num_target_tokens", display_name="# target tokens", lower_is_better=None),
            MetricMetadata(
                name="target_aligned",
                display_name="Target token-aligned",
                description="Fraction of instances whose target starts at a token boundary.",
                lower_is_better=None,
            ),
            MetricMetadata(
                name="prompt_truncated",
                display_name="truncated",
                description="Fraction of passages cut to fit the model's window (not scored).",
                lower_is_better=None,
            ),
            MetricMetadata(
                name="target_perplexity",
                display_name="Target perplexity",
                description="exp(-mean target log-likelihood), lm-evaluation-harness's LAMBADA perplexity.",
                lower_is_better=True,
            ),
        ]
