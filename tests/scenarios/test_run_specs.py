"""Run specs: every scenario name constructs through HELM's factory; bad descriptions are clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helm.benchmark.run_spec_factory import construct_run_specs
from helm.common.object_spec import parse_object_spec

from scenarios.errors import ScenarioArgumentError
from scenarios.run_specs import build_run_specs

MODEL = "model=openai/gpt2"  # a deployment HELM knows without loading its config files

DESCRIPTIONS = {
    # ours
    "lambada": ("scenarios.lambada.LambadaScenario", "generation"),
    "lambada:method=likelihood": ("scenarios.lambada.LambadaScenario", "multiple_choice_separate_original"),
    "wikitext": ("scenarios.wikitext.WikiTextScenario", "language_modeling"),
    "synthetic:num_prompts=4,prompt_len=512,output_len=32": ("scenarios.synthetic.SyntheticScenario", "generation"),
    # HELM's own, through HELM's run-spec functions
    "mmlu:subject=abstract_algebra": ("helm.benchmark.scenarios.mmlu_scenario.MMLUScenario", None),
    "mmlu:subject=us_foreign_policy": ("helm.benchmark.scenarios.mmlu_scenario.MMLUScenario", None),
    "synthetic_reasoning:mode=pattern_match": (
        "helm.benchmark.scenarios.synthetic_reasoning_scenario.SyntheticReasoningScenario",
        None,
    ),
    "synthetic_reasoning_natural:difficulty=easy": (
        "helm.benchmark.scenarios.synthetic_reasoning_natural_scenario.SRNScenario",
        None,
    ),
    "wikifact:k=5,subject=plaintiff": ("helm.benchmark.scenarios.wikifact_scenario.WIKIFactScenario", None),
    "wikifact:k=5,subject=instance_of": ("helm.benchmark.scenarios.wikifact_scenario.WIKIFactScenario", None),
    "summarization_xsum_sampled": ("helm.benchmark.scenarios.summarization_scenario.SummarizationScenario", None),
}


def with_model(description: str) -> str:
    return f"{description}{',' if ':' in description else ':'}{MODEL}"


@pytest.mark.parametrize("description", DESCRIPTIONS)
def test_every_scenario_constructs_through_helm(description):
    scenario_class, method = DESCRIPTIONS[description]
    (run_spec,) = construct_run_specs(parse_object_spec(with_model(description)))
    assert run_spec.scenario_spec.class_name == scenario_class
    assert run_spec.adapter_spec.model == "openai/gpt2"
    if method:
        assert run_spec.adapter_spec.method == method
    assert build_run_specs(with_model(description))[0].name == run_spec.name


def test_unknown_scenario_name_suggests_close_ones():
    with pytest.raises(ScenarioArgumentError, match="unknown scenario 'lambda'; did you mean lambada"):
        build_run_specs(f"lambda:{MODEL}")


def test_unknown_missing_and_mistyped_arguments():
    with pytest.raises(ScenarioArgumentError, match="lambada: unknown argument.s. methd; it takes method, max_tokens"):
        build_run_specs(f"lambada:methd=greedy,{MODEL}")
    with pytest.raises(ScenarioArgumentError, match="mmlu: missing argument.s. subject"):
        build_run_specs(f"mmlu:{MODEL}")
    with pytest.raises(ScenarioArgumentError, match="synthetic: num_prompts must be an integer, got 'abc'"):
        build_run_specs(f"synthetic:num_prompts=abc,{MODEL}")
    with pytest.raises(ScenarioArgumentError, match="lambada: method must be one of greedy, likelihood"):
        build_run_specs(f"lambada:method=sample,{MODEL}")
    with pytest.raises(ScenarioArgumentError, match="expected name:key=value"):
        build_run_specs("lambada:method")


def test_importing_scenarios_is_cheap():
    code = (
        "import sys, scenarios, scenarios.errors; assert 'helm' not in sys.modules\n"
        "import scenarios.run_specs; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
