"""WikiText: article split, word perplexity over multi-window documents, the LM adapter's windows."""

from __future__ import annotations

import math

import pytest
from helm.benchmark.adaptation.adapters.language_modeling_adapter import LanguageModelingAdapter
from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.scenarios.scenario import Input, Instance, with_instance_ids

from scenarios.data_files import SHIPPED_WIKITEXT, split_articles
from scenarios.errors import ScenarioArgumentError, ScenarioDataError
from scenarios.run_specs import wikitext_run_spec
from scenarios.wikitext import WikiTextScenario
from scenarios.wikitext_metrics import WordPerplexityMetric, count_words
from tests.scenarios.helm_stubs import CharWindowService, answered, make_adapter


def test_shipped_test_split_is_62_articles(tmp_path):
    instances = WikiTextScenario().get_instances(str(tmp_path))
    assert len(instances) == 62
    assert instances[0].input.text.startswith(" = Robert Boulter = \n")
    assert all(i.split == "test" and not i.references for i in instances)
    # Nothing lost but the blank first line: the documents put back together are the file.
    text = SHIPPED_WIKITEXT["test"].read_text(encoding="utf-8")
    assert "\n".join(i.input.text for i in instances) == text[len(" \n") :]


def test_articles_split_at_top_level_headings_only():
    text = " \n = A = \n \n x y \n = = Sub = = \n z \n = B = \n w \n"
    assert split_articles(text) == [" = A = \n \n x y \n = = Sub = = \n z ", " = B = \n w \n"]


def test_wikitext_errors(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("no headings here\n")
    with pytest.raises(ScenarioDataError, match="no ' = Title = ' heading"):
        WikiTextScenario(path=str(plain)).get_instances(str(tmp_path))
    with pytest.raises(ScenarioDataError, match="no such file"):
        WikiTextScenario(path=str(tmp_path / "missing.raw")).get_instances(str(tmp_path))
    with pytest.raises(ScenarioArgumentError, match="split must be one of test, valid; got 'train'"):
        wikitext_run_spec(split="train")


def test_word_count_is_lm_eval_definition():
    # re.split counts the empty strings at the ends of a document that starts/ends with whitespace.
    assert count_words(" = A = \n x y \n") == len(["", "=", "A", "=", "x", "y", ""])


def test_word_perplexity_counts_each_document_once_over_its_windows():
    docs = with_instance_ids(
        [Instance(Input(text=" a b c d "), [], split="test"), Instance(Input(text="e f"), [], split="test")]
    )
    # Document 0 comes in two windows (conditioning tokens not scored), document 1 in one.
    states = [
        answered(docs[0], [("^", 0.0), (" a", -1.0), (" b", -2.0)], num_conditioning_tokens=1),
        answered(docs[0], [(" b", -9.0), (" c", -1.0), (" d", -1.0), (" ", -1.0)], num_conditioning_tokens=1),
        answered(docs[1], [("^", 0.0), ("e", -2.0), (" f", -2.0)], num_conditioning_tokens=1),
    ]
    spec = wikitext_run_spec().adapter_spec
    result = WordPerplexityMetric().evaluate(ScenarioState(spec, states), None, "", parallelism=1)
    (word_ppl,) = [s for s in result.aggregated_stats if s.name.name == "word_perplexity"]
    words = count_words(" a b c d ") + count_words("e f")  # 6 + 2
    assert word_ppl.mean == pytest.approx(math.exp((6.0 + 4.0) / words))
    per_doc = {p.instance_id: {s.name.name: s.mean for s in p.stats} for p in result.per_instance_stats}
    assert per_doc["id0"] == {"num_words": 6, "word_perplexity": pytest.approx(math.exp(6.0 / 6))}
    assert len(per_doc) == 2


def _windows(document: str, max_sequence_length: int, max_request_length: int) -> list[tuple[str, int]]:
    spec = wikitext_run_spec().adapter_spec
    service = CharWindowService(max_sequence_length=max_sequence_length, max_request_length=max_request_length)
    instances = with_instance_ids([Instance(Input(text=document), [], split="test")])
    states = make_adapter(LanguageModelingAdapter, spec, service).adapt(instances, parallelism=1)
    assert all(s.request.echo_prompt and s.request.max_tokens == 0 for s in states)
    return [(s.request.prompt, s.num_conditioning_tokens) for s in states]


def test_lm_windows_with_request_length_one_more_than_sequence_length_are_lm_eval_rolling_windows():
    # L = 4, R = 5: every character scored once, windows of 4 scored tokens after one conditioning token.
    windows = _windows("abcdefghijk", max_sequence_length=4, max_request_length=5)
    assert windows == [("^abcd", 1), ("defgh", 1), ("ghijk", 2)]  # the last window reaches back: 5 tokens
    scored = "".join(prompt[n:] for prompt, n in windows)
    assert scored == "abcdefghijk"


def test_lm_windows_with_default_request_length_skip_one_token():
    # R = L (a deployment that sets only max_sequence_length): HELM trims the first window and never
    # scores token L-1 ("d"); the module docstring says so.
    windows = _windows("abcdefghijk", max_sequence_length=4, max_request_length=4)
    scored = "".join(prompt[n:] for prompt, n in windows)
    assert windows[0] == ("^abc", 1)
    assert scored == "abcefghijk"
