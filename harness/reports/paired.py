"""Uncertainty of a run's main metric and of a difference between two runs on the same instances.

A quality metric of a run is f(sum of numerators / sum of denominators) over its instances (`FORMS`): a mean for
accuracies (value, 1), a ratio of sums for perplexities (log-probability, tokens). Its standard error is the
standard deviation of that statistic over bootstrap resamples of the instances; the difference between a
compressed run and its baseline is bootstrapped in pairs, the same resampled instances on both sides, which is
what makes a 0.3-point difference on 300 passages readable (the two runs' errors are strongly correlated).
Instances come from HELM's `per_instance_stats.json`, unperturbed, matched by instance id (and, for runs that send
several requests per instance, the order of their entries).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

RESAMPLES = 2000
_LN2 = math.log(2)


@dataclass(frozen=True)
class Form:
    """metric = finish(sum(numerator) / sum(denominator)) over instances."""

    numerator: str
    denominator: str | None = None
    """Stat name, or None: 1 per instance (a mean)."""
    finish: str = "identity"
    """`identity`, `exp_neg` (perplexity from a mean log-probability) or `neg_log2` (bits from nats)."""


FORMS = {
    "lambada_accuracy": Form("lambada_accuracy"), "exact_match": Form("exact_match"),
    "quasi_exact_match": Form("quasi_exact_match"), "f1_score": Form("f1_score"), "rouge_2": Form("rouge_2"),
    "target_logprob": Form("target_logprob"), "target_perplexity": Form("target_logprob", None, "exp_neg"),
    "perplexity": Form("logprob", "num_perplexity_tokens", "exp_neg"),
    "bits_per_byte": Form("logprob", "num_bytes", "neg_log2"),
    # per document: word_perplexity = exp(-logprob / num_words), so logprob = -num_words * ln(word_perplexity)
    "word_perplexity": Form("word_logprob", "num_words", "exp_neg"),
}


@dataclass(frozen=True)
class Paired:
    """A compressed run against its baseline on the instances both have."""

    n: int
    baseline: float
    value: float
    baseline_se: float
    se: float
    delta: float
    delta_low: float
    """2.5th percentile of the paired bootstrap of value - baseline."""
    delta_high: float


def instance_terms(run_dir: Path, metric: str) -> dict[tuple[str, int], tuple[float, float]]:
    """(instance id, n-th entry of that id) -> (numerator, denominator) of `metric`, unperturbed instances."""
    form = FORMS[metric]
    out: dict[tuple[str, int], tuple[float, float]] = {}
    seen: dict[str, int] = {}
    for entry in json.loads((run_dir / "per_instance_stats.json").read_text()):
        stats = {s["name"]["name"]: s for s in entry["stats"]
                 if s["name"].get("perturbation") is None and s.get("count")}
        if metric == "word_perplexity" and {"word_perplexity", "num_words"} <= set(stats):
            words = _mean(stats["num_words"])
            stats["word_logprob"] = {"sum": -words * math.log(_mean(stats["word_perplexity"])), "count": 1}
        if form.numerator not in stats or (form.denominator and form.denominator not in stats):
            continue
        key = entry["instance_id"]
        seen[key] = seen.get(key, -1) + 1
        out[(key, seen[key])] = (_mean(stats[form.numerator]),
                                 _mean(stats[form.denominator]) if form.denominator else 1.0)
    return out


def value_over(run_dir: Path, metric: str, instance_ids: list[str]) -> float:
    """`metric` of the run over the instances `instance_ids` alone (every entry of each: a WikiText article has one
    per window): its figure on a sample of its instances."""
    wanted = set(instance_ids)
    picked = [t for (i, _), t in instance_terms(run_dir, metric).items() if i in wanted]
    num, den = (sum(t[k] for t in picked) for k in (0, 1))
    return float(_finish(metric, num / den))


def standard_error(run_dir: Path, metric: str) -> float:
    """Bootstrap standard error of `metric` over the run's instances (NaN without per-instance terms)."""
    terms = list(instance_terms(run_dir, metric).values())
    if len(terms) < 2:
        return math.nan
    import numpy as np

    num, den = np.array(terms).T
    idx = _resamples(len(terms))
    return float(np.std(_finish(metric, num[idx].sum(1) / den[idx].sum(1)), ddof=1))


def compare(baseline_dir: Path, run_dir: Path, metric: str) -> Paired | None:
    """The paired comparison of `metric`, or None when the runs share fewer than two instances."""
    import numpy as np

    a, b = instance_terms(baseline_dir, metric), instance_terms(run_dir, metric)
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return None
    an, ad = np.array([a[k] for k in keys]).T
    bn, bd = np.array([b[k] for k in keys]).T
    idx = _resamples(len(keys))
    base = _finish(metric, an[idx].sum(1) / ad[idx].sum(1))
    comp = _finish(metric, bn[idx].sum(1) / bd[idx].sum(1))
    point_a = float(_finish(metric, an.sum() / ad.sum()))
    point_b = float(_finish(metric, bn.sum() / bd.sum()))
    low, high = np.percentile(comp - base, [2.5, 97.5])
    return Paired(len(keys), point_a, point_b, float(np.std(base, ddof=1)), float(np.std(comp, ddof=1)),
                  point_b - point_a, float(low), float(high))


def _resamples(n: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, n, size=(RESAMPLES, n))  # seeded: a report is reproducible


def _finish(metric: str, x):
    import numpy as np

    kind = FORMS[metric].finish
    return np.exp(-x) if kind == "exp_neg" else -x / _LN2 if kind == "neg_log2" else x


def _mean(stat: dict) -> float:
    return float(stat["sum"]) / float(stat["count"])
