"""Synthetic throughput workload: sizes, determinism, argument errors."""

from __future__ import annotations

import pytest

from scenarios.errors import ScenarioArgumentError
from scenarios.run_specs import synthetic_run_spec
from scenarios.synthetic import NUM_WORDS, SyntheticScenario


def test_prompts_have_prompt_len_words_from_a_small_vocabulary(tmp_path):
    instances = SyntheticScenario(num_prompts=5, prompt_len=40).get_instances(str(tmp_path))
    assert len(instances) == 5
    assert all(len(i.input.text.split(" ")) == 40 and i.split == "test" for i in instances)
    assert len({i.input.text for i in instances}) == 5  # distinct prompts: no prefix caching effects
    vocabulary = {w for i in instances for w in i.input.text.split(" ")}
    assert len(vocabulary) <= NUM_WORDS and "the" in vocabulary
    again = SyntheticScenario(num_prompts=5, prompt_len=40).get_instances(str(tmp_path))
    assert [i.input.text for i in again] == [i.input.text for i in instances]


def test_run_spec_sets_output_length_and_accepts_numbers_as_text():
    run_spec = synthetic_run_spec(num_prompts="8", prompt_len=16, output_len="4")
    assert run_spec.name == "synthetic:num_prompts=8,prompt_len=16,output_len=4"
    assert (run_spec.adapter_spec.max_tokens, run_spec.adapter_spec.temperature) == (4, 0.0)
    assert run_spec.adapter_spec.stop_sequences == []
    assert run_spec.scenario_spec.args == {"num_prompts": 8, "prompt_len": 16, "seed": 0}


@pytest.mark.parametrize(
    "args, message",
    [
        ({"num_prompts": "abc"}, "num_prompts must be an integer, got 'abc'"),
        ({"prompt_len": 1.5}, "prompt_len must be an integer, got 1.5"),
        ({"output_len": 0}, "output_len must be >= 1, got 0"),
        ({"num_prompts": True}, "num_prompts must be an integer, got True"),
    ],
)
def test_wrong_argument_types_are_clear_errors(args, message):
    with pytest.raises(ScenarioArgumentError, match=message):
        synthetic_run_spec(**args)
