"""Standard errors and paired bootstrap intervals (`harness.reports.paired`) on per-instance stats written by hand."""

from __future__ import annotations

import json
import math

import pytest

from harness.reports.paired import compare, standard_error, value_over


def write_run(folder, stats_per_instance: list[dict[str, float]]):
    folder.mkdir()
    entries = [{"instance_id": f"id{i}", "train_trial_index": 0,
                "stats": [{"name": {"name": k, "split": "test"}, "sum": v, "count": 1} for k, v in stats.items()]}
               for i, stats in enumerate(stats_per_instance)]
    (folder / "per_instance_stats.json").write_text(json.dumps(entries))
    return folder


def test_accuracy_standard_error_and_a_paired_difference(tmp_path):
    n = 400
    base = write_run(tmp_path / "a", [{"lambada_accuracy": float(i % 4 == 0)} for i in range(n)])  # p = 0.25
    # the compressed run loses 20 of the 100 right answers and gains none: a real, small difference
    comp = write_run(tmp_path / "b", [{"lambada_accuracy": float(i % 4 == 0 and i % 20 != 0)} for i in range(n)])
    assert standard_error(base, "lambada_accuracy") == pytest.approx(math.sqrt(0.25 * 0.75 / n), rel=0.1)
    pair = compare(base, comp, "lambada_accuracy")
    assert (pair.n, pair.baseline, pair.value) == (n, 0.25, 0.2) and pair.delta == pytest.approx(-0.05)
    assert pair.delta_low < -0.05 < pair.delta_high < 0  # excludes 0: every changed answer went one way
    # unpaired, the two standard errors (~0.02 each) would not tell -0.05 from noise this clearly
    assert pair.delta_high - pair.delta_low < 2 * 1.96 * math.hypot(pair.baseline_se, pair.se) / 2


def test_perplexity_is_a_ratio_of_sums_and_noise_straddles_zero(tmp_path):
    import random

    rng = random.Random(0)
    rows = [{"logprob": -rng.uniform(100, 300), "num_perplexity_tokens": 100.0} for _ in range(50)]
    base = write_run(tmp_path / "a", rows)
    jitter = write_run(tmp_path / "b", [{**r, "logprob": r["logprob"] + rng.gauss(0, 1)} for r in rows])
    pair = compare(base, jitter, "perplexity")
    want = math.exp(-sum(r["logprob"] for r in rows) / sum(r["num_perplexity_tokens"] for r in rows))
    assert pair.baseline == pytest.approx(want)
    assert pair.delta_low < 0 < pair.delta_high  # symmetric noise: no difference claimed


def test_unpaired_instances_give_no_comparison(tmp_path):
    a = write_run(tmp_path / "a", [{"exact_match": 1.0}])
    b = write_run(tmp_path / "b", [{"exact_match": 0.0}])
    assert compare(a, b, "exact_match") is None and math.isnan(standard_error(a, "exact_match"))


def test_a_sample_of_articles_counts_every_window_of_each(tmp_path):
    # WikiText: an article's windows are entries of one instance id; a sample's perplexity sums all of them
    windows = [("id0", -100.0, 50.0), ("id0", -300.0, 100.0), ("id1", -10.0, 10.0), ("id2", -60.0, 20.0)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "per_instance_stats.json").write_text(json.dumps([
        {"instance_id": i, "train_trial_index": 0, "stats": [
            {"name": {"name": "logprob", "split": "test"}, "sum": lp, "count": 1},
            {"name": {"name": "num_perplexity_tokens", "split": "test"}, "sum": n, "count": 1}]}
        for i, lp, n in windows]))
    assert value_over(run, "perplexity", ["id0", "id2"]) == pytest.approx(math.exp(460 / 170))
