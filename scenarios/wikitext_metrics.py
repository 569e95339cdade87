"""Word perplexity for language-modelling runs (lm-evaluation-harness's `word_perplexity`).

HELM's `LanguageModelingMetric` already gives token perplexity and bits per byte; this adds
exp(-sum logprob / sum words) over the run, words = len(re.split(r"\\s+", doc)) of each document
counted once, however many window requests the `language_modeling` adapter made of it.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.metrics.metric import MetricInterface, MetricMetadata, MetricResult, PerInstanceStats, add_context
from helm.benchmark.metrics.metric_name import MetricContext, MetricName
from helm.benchmark.metrics.metric_service import MetricService
from helm.benchmark.metrics.statistic import Stat, merge_stat
from helm.benchmark.scenarios.scenario import Instance


def count_words(document: str) -> int:
    """lm-evaluation-harness's word count (wikitext): len(re.split(r"\\s+", doc)), on the raw document."""
    return len(re.split(r"\s+", document))


@dataclass
class _Document:
    instance: Instance
    logprob: float = 0.0


class WordPerplexityMetric(MetricInterface):
    """`word_perplexity` per run (and per document in the per-instance stats), `num_words` per document."""

    def __repr__(self) -> str:
        return "WordPerplexityMetric()"

    def evaluate(
        self, scenario_state: ScenarioState, metric_service: MetricService, eval_cache_path: str, parallelism: int
    ) -> MetricResult:
        # Imported here: basic_metrics fetches NLTK data when imported (the runner has it loaded by now), and
        # reusing it keeps "which tokens of a window are scored" defined in one place (HELM's).
        from helm.benchmark.metrics.basic_metrics import compute_language_modeling_metrics

        documents: dict[object, _Document] = {}
        for request_state in scenario_state.request_states:
            instance = request_state.instance
            # Instances are renumbered by the runner; a reloaded scenario state has one Instance copy per request.
            document = documents.setdefault(instance.id if instance.id is not None else instance, _Document(instance))
            for stat in compute_language_modeling_metrics(scenario_state.adapter_spec, request_state, metric_service):
                if stat.name.name == "logprob":
                    document.logprob += stat.sum

        totals: dict[MetricContext, list[float]] = defaultdict(lambda: [0.0, 0])  # context -> [logprob, words]
        per_instance: list[PerInstanceStats] = []
        aggregated: dict[MetricName, Stat] = {}
        for document in documents.values():
            instance = document.instance
            context = MetricContext.from_instance(instance)
            words = count_words(instance.input.text)
            totals[context][0] += document.logprob
            totals[context][1] += words
            stats = [
                add_context(Stat(MetricName("num_words")).add(words), context),
                add_context(Stat(MetricName("word_perplexity")).add(math.exp(-document.logprob / words)), context),
            ]
            per_instance.append(PerInstanceStats(str(instance.id), instance.perturbation, 0, stats))
            merge_stat(aggregated, stats[0])

        result = [stat.take_mean() for stat in aggregated.values()]
        for context, (logprob, words) in totals.items():
            result.append(add_context(Stat(MetricName("word_perplexity")).add(math.exp(-logprob / words)), context))
        return MetricResult(result, per_instance)

    def get_metadata(self) -> list[MetricMetadata]:
        return [
            MetricMetadata(
                name="word_perplexity",
                display_name="Word perplexity",
                short_display_name="Word PPL",
                description="exp(-sum log-prob / sum words) over the documents, words = len(re.split(r'\\s+', doc)) "
                "(lm-evaluation-harness).",
                lower_is_better=True,
            ),
            MetricMetadata(
                name="num_words", display_name="# words", description="Words per document.", lower_is_better=None
            ),
        ]
