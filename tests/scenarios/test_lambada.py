"""LAMBADA: instances from each source, data errors, both metrics on hand-built results, adapted prompts."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from helm.benchmark.adaptation.adapters.generation_adapter import GenerationAdapter
from helm.benchmark.adaptation.adapters.multiple_choice_separate_adapter import MultipleChoiceSeparateAdapter
from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.scenarios.scenario import with_instance_ids
from helm.common.request import GeneratedOutput, Token

from scenarios.errors import ScenarioArgumentError, ScenarioDataError
from scenarios.lambada import SHIPPED_LAMBADA, LambadaScenario, make_instance, split_passage
from scenarios.lambada_metrics import (
    LambadaAccuracyMetric,
    LambadaLikelihoodMetric,
    covering_suffix,
    spells_at_token_boundary,
)
from scenarios.run_specs import lambada_run_spec
from tests.scenarios.helm_stubs import CharWindowService, answered, make_adapter


def test_shipped_test_set_has_5153_passages(tmp_path):
    instances = LambadaScenario().get_instances(str(tmp_path))
    assert len(instances) == 5153
    first = instances[0]
    assert first.split == "test" and len(first.references) == 1 and first.references[0].is_correct
    assert " " not in first.references[0].output.text
    with open(SHIPPED_LAMBADA, encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    assert first.input.text + " " + first.references[0].output.text == text


def test_split_at_last_space_like_lm_eval():
    assert split_passage("he said hello  to Harlin") == ("he said hello  to", "Harlin")
    with pytest.raises(ValueError):
        split_passage("nospace")


def test_local_jsonl_and_txt_sources(tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"passage": "a b c"}\n\n{"passage": "x y"}\n')
    instances = LambadaScenario(path=str(jsonl), text_field="passage").get_instances(str(tmp_path))
    assert [(i.input.text, i.references[0].output.text) for i in instances] == [("a b", "c"), ("x", "y")]
    txt = tmp_path / "mine.txt"
    txt.write_text("one two three \n\nfour five\n")
    instances = LambadaScenario(path=str(txt)).get_instances(str(tmp_path))
    assert [(i.input.text, i.references[0].output.text) for i in instances] == [("one two", "three"), ("four", "five")]


def test_datasets_source_from_a_local_folder(tmp_path):
    folder = tmp_path / "my_lambada"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"text": "the cat sat on the mat"}\n')
    instances = LambadaScenario(dataset=str(folder)).get_instances(str(tmp_path / "out"))
    assert [(i.input.text, i.references[0].output.text) for i in instances] == [("the cat sat on the", "mat")]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n{"text": "c d"\n')
    with pytest.raises(ScenarioDataError, match=r"bad\.jsonl:2: not valid JSON"):
        LambadaScenario(path=str(bad)).get_instances(str(tmp_path))
    bad.write_text('{"text": "a b"}\n{"txt": "c d"}\n')
    with pytest.raises(ScenarioDataError, match=r"bad\.jsonl:2: expected an object with a string field 'text'"):
        LambadaScenario(path=str(bad)).get_instances(str(tmp_path))
    bad.write_text('{"text": "a b"}\n{"text": "single"}\n')
    with pytest.raises(ScenarioDataError, match=r"passage 2: a passage needs"):
        LambadaScenario(path=str(bad)).get_instances(str(tmp_path))


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(ScenarioDataError, match="no such file .*nowhere.jsonl"):
        LambadaScenario(path=str(tmp_path / "nowhere.jsonl")).get_instances(str(tmp_path))
    with pytest.raises(ScenarioDataError, match="failed offline"):
        LambadaScenario(dataset=str(tmp_path / "no_such_dataset")).get_instances(str(tmp_path))
    with pytest.raises(ScenarioArgumentError, match="not both"):
        LambadaScenario(path="a.jsonl", dataset="b")
    with pytest.raises(ScenarioArgumentError, match=".jsonl or .txt"):
        LambadaScenario(path="a.csv")
    with pytest.raises(ScenarioArgumentError, match="method must be one of greedy, likelihood; got 'beam'"):
        lambada_run_spec(method="beam")
    with pytest.raises(ScenarioArgumentError, match="max_tokens must be an integer, got 'many'"):
        lambada_run_spec(max_tokens="many")


# --- greedy accuracy -----------------------------------------------------------------------------------


def test_boundary_rule():
    def tokens(*texts):
        return [Token(t, 0.0) for t in texts]

    assert spells_at_token_boundary(tokens(" Har", "lin", ".", " He"), " Harlin")
    assert spells_at_token_boundary(tokens(" Harlin"), " Harlin")
    assert not spells_at_token_boundary(tokens(" Har", "ling"), " Harlin")  # word goes on: not the target
    assert not spells_at_token_boundary(tokens(" Harlin's"), " Harlin")  # no token boundary after the word
    assert not spells_at_token_boundary(tokens("Harlin"), " Harlin")  # the space is part of the target
    assert not spells_at_token_boundary(tokens(" Har"), " Harlin")  # stopped early
    # A character split over byte tokens (HELM notation) still spells the word.
    assert spells_at_token_boundary(tokens(" caf", "bytes:\\xc3", "bytes:\\xa9", "!"), " café")


def test_accuracy_metric_on_request_states():
    instance = make_instance("I look at him and say Harlin")
    metric = LambadaAccuracyMetric()
    spec = lambada_run_spec().adapter_spec
    right = answered(instance, [(" Har", -0.5), ("lin", -0.1), ("\n", -2.0)])
    wrong = answered(instance, [(" Harl", -0.5), ("ing", -0.1)])
    assert metric.evaluate_generation(spec, right, None, "")[0].mean == 1.0
    assert metric.evaluate_generation(spec, wrong, None, "")[0].mean == 0.0

    instances = with_instance_ids([instance, make_instance("a b c"), make_instance("d e f")])
    states = [
        answered(instances[0], [(" Harlin", -1.0)]),
        answered(instances[1], [(" c", -1.0), (".", -1.0)]),
        answered(instances[2], [(" g", -1.0)]),
    ]
    result = metric.evaluate(ScenarioState(spec, states), None, "", parallelism=1)
    (accuracy,) = [s for s in result.aggregated_stats if s.name.name == "lambada_accuracy" and not s.name.perturbation]
    assert accuracy.mean == pytest.approx(2 / 3)
    assert len(result.per_instance_stats) == 3


def test_accuracy_metric_leaves_out_a_truncated_prompt():
    state = answered(make_instance("a b"), [(" b", 0.0)])
    state = dataclasses.replace(state, prompt_truncated=True)
    assert LambadaAccuracyMetric().evaluate_generation(lambada_run_spec().adapter_spec, state, None, "") == []


def test_accuracy_metric_refuses_text_without_tokens():
    state = answered(make_instance("a b"), [])
    state.result.completions[0] = GeneratedOutput(text=" b", logprob=0.0, tokens=[])
    with pytest.raises(ValueError, match="needs the generated tokens"):
        LambadaAccuracyMetric().evaluate_generation(lambada_run_spec().adapter_spec, state, None, "")


# --- likelihood ----------------------------------------------------------------------------------------


def test_covering_suffix():
    tokens = [Token(t, lp) for t, lp in [("say", 0.0), (" Har", -1.0), ("lin", -0.5)]]
    assert covering_suffix(tokens, " Harlin") == (tokens[1:], True)
    # The context's last token swallowed the space: it is counted with the target and flagged.
    tokens2 = [Token(t, lp) for t, lp in [("say ", -3.0), ("Harlin", -1.0)]]
    assert covering_suffix(tokens2, " Harlin") == (tokens2, False)


def test_likelihood_metric_sums_target_tokens_and_reports_perplexity():
    spec = lambada_run_spec(method="likelihood").adapter_spec
    instances = with_instance_ids([make_instance("I look at Harlin"), make_instance("the cat sat")])
    states = [
        answered(instances[0], [("I", 0.0), (" look", -4.0), (" at", -2.0), (" Har", -1.0), ("lin", -0.5)], 0),
        answered(instances[1], [("the", 0.0), (" cat", -3.0), (" sat", -2.0)], 0),
    ]
    result = LambadaLikelihoodMetric().evaluate(ScenarioState(spec, states), None, "", parallelism=1)
    stats = {s.name.name: s for s in result.aggregated_stats if not s.name.perturbation}
    assert stats["target_logprob"].mean == pytest.approx((-1.5 - 2.0) / 2)
    assert stats["target_logprob_per_token"].mean == pytest.approx((-0.75 - 2.0) / 2)
    assert stats["num_target_tokens"].mean == pytest.approx(1.5)
    assert stats["target_aligned"].mean == 1.0
    assert stats["target_perplexity"].mean == pytest.approx(math.exp(1.75))
    assert stats["prompt_truncated"].mean == 0.0


def test_likelihood_metric_skips_a_passage_cut_to_fit_the_window():
    # HELM cuts a too-long prompt from the right: the target is gone, so the passage is counted, not scored.
    spec = lambada_run_spec(method="likelihood").adapter_spec
    instances = with_instance_ids([make_instance("I look at Harlin"), make_instance("the cat sat")])
    states = [
        answered(instances[0], [("I", 0.0), (" look", -4.0), (" at", -2.0)], 0),  # prompt "I look at"
        answered(instances[1], [("the", 0.0), (" cat", -3.0), (" sat", -2.0)], 0),
    ]
    result = LambadaLikelihoodMetric().evaluate(ScenarioState(spec, states), None, "", parallelism=1)
    stats = {s.name.name: s for s in result.aggregated_stats if not s.name.perturbation}
    assert stats["prompt_truncated"].mean == 0.5
    assert (stats["target_logprob"].count, stats["target_logprob"].mean) == (1, -2.0)


# --- adapted requests ----------------------------------------------------------------------------------


def test_greedy_request_is_the_context_and_likelihood_request_echoes_context_space_target():
    instances = with_instance_ids([make_instance("I look at him and say Harlin")])
    greedy_spec = lambada_run_spec().adapter_spec
    (greedy,) = make_adapter(GenerationAdapter, greedy_spec, CharWindowService()).adapt(instances, parallelism=1)
    assert greedy.request.prompt == "I look at him and say"
    assert (greedy.request.temperature, greedy.request.max_tokens, greedy.request.echo_prompt) == (0, 12, False)
    assert greedy.request.stop_sequences == []

    likelihood_spec = lambada_run_spec(method="likelihood").adapter_spec
    adapter = make_adapter(MultipleChoiceSeparateAdapter, likelihood_spec, CharWindowService())
    (scored,) = adapter.adapt(instances, parallelism=1)
    assert scored.request.prompt == "I look at him and say Harlin"
    assert (scored.request.echo_prompt, scored.request.max_tokens, scored.reference_index) == (True, 0, 0)
