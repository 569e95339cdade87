"""Run-spec functions of flexhelm's scenarios; importing this module registers them with HELM.

- `lambada[:method=greedy][,max_tokens=12]`: `LambadaScenario`; HELM generation adapter, temperature 0;
  metrics `lambada_accuracy` + HELM's basic generation metrics (runtime, token counts).
- `lambada:method=likelihood`: the same instances; HELM multiple_choice_separate_original adapter (one echo
  request over context + " " + target, max_tokens=0); metrics `target_logprob`, `target_perplexity`, ...
- `wikitext[:split=valid][,path=...]`: `WikiTextScenario`; HELM language_modeling adapter (rolling windows,
  see `scenarios.wikitext`); metrics HELM's `perplexity`, `bits_per_byte` + `word_perplexity`.
- `synthetic:num_prompts=..,prompt_len=..,output_len=..[,seed=..]`: `SyntheticScenario`; HELM generation
  adapter, temperature 0, `max_tokens=output_len`, no stop sequence; HELM's basic generation metrics.

LAMBADA's source arguments (`path`, `dataset`, `dataset_config`, `split`, `text_field`) pass through to
`LambadaScenario`. HELM's own scenarios (`mmlu`, `wikifact`, `synthetic_reasoning`, ...) keep HELM's
run-spec functions; `scenarios.helm_offline.install()` feeds them offline.

`build_run_specs(description)` is HELM's `construct_run_specs` with clear errors for an unknown scenario
name or argument.
"""

from __future__ import annotations

import difflib
import inspect
from enum import Enum

from helm.benchmark.adaptation.adapter_spec import (
    ADAPT_GENERATION,
    ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL,
    AdapterSpec,
)
from helm.benchmark.adaptation.common_adapter_specs import get_language_modeling_adapter_spec
from helm.benchmark.metrics.common_metric_specs import (
    get_basic_generation_metric_specs,
    get_generic_metric_specs,
    get_language_modeling_metric_specs,
)
from helm.benchmark.metrics.metric import MetricSpec
from helm.benchmark.run_spec import RunSpec, get_run_spec_function, run_spec_function
from helm.benchmark.scenarios.scenario import ScenarioSpec

from scenarios.arguments import as_choice, as_int
from scenarios.errors import ScenarioArgumentError
from scenarios.lambada import LambadaScenario
from scenarios.synthetic import SyntheticScenario
from scenarios.wikitext import WikiTextScenario

LAMBADA_MAX_TOKENS = 12
"""Greedy tokens generated per LAMBADA passage: the longest target (" " + word) is 10 GPT-2/OPT tokens."""


class LambadaMethod(str, Enum):
    GREEDY = "greedy"
    """Generate greedily, compare with " " + target (accuracy)."""
    LIKELIHOOD = "likelihood"
    """Score context + " " + target in one echo request (target log-likelihood)."""


def _name(base: str, args: dict[str, object]) -> str:
    """HELM-style run name: `base:k=v,...` over the arguments that were given."""
    given = ",".join(f"{k}={v}" for k, v in args.items() if v is not None)
    return f"{base}:{given}" if given else base


def _bare_adapter_spec(**fields) -> AdapterSpec:
    """No instructions, prefixes or in-context examples: the prompt is the instance's text."""
    base = dict(
        instructions="",
        input_prefix="",
        input_suffix="",
        output_prefix="",
        output_suffix="",
        instance_prefix="",
        max_train_instances=0,
        num_outputs=1,
        temperature=0.0,
        stop_sequences=[],
    )
    return AdapterSpec(**{**base, **fields})


def _scenario_spec(scenario_class: type, args: dict[str, object]) -> ScenarioSpec:
    args = {k: v for k, v in args.items() if v is not None}
    scenario_class(**args)  # constructors are light and validate their arguments: fail here, not mid-run
    return ScenarioSpec(class_name=f"{scenario_class.__module__}.{scenario_class.__name__}", args=args)


@run_spec_function("lambada")
def lambada_run_spec(
    method: str = LambadaMethod.GREEDY.value,
    max_tokens: int = LAMBADA_MAX_TOKENS,
    path: str | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    text_field: str | None = None,
) -> RunSpec:
    method = LambadaMethod(as_choice("lambada", "method", method, [m.value for m in LambadaMethod]))
    source = dict(path=path, dataset=dataset, dataset_config=dataset_config, split=split, text_field=text_field)
    scenario_spec = _scenario_spec(LambadaScenario, source)
    if method is LambadaMethod.GREEDY:
        tokens = as_int("lambada", "max_tokens", max_tokens, minimum=1)
        adapter_spec = _bare_adapter_spec(method=ADAPT_GENERATION, max_tokens=tokens)
        metric_specs = [MetricSpec(class_name="scenarios.lambada_metrics.LambadaAccuracyMetric", args={})]
        metric_specs += get_basic_generation_metric_specs([]) + get_generic_metric_specs()
        name_args = {"method": method.value, "max_tokens": tokens if tokens != LAMBADA_MAX_TOKENS else None}
    else:
        # The target is the instance's one reference; the adapter appends output_prefix + target to the
        # context and asks for the echoed prompt's log-probs (max_tokens=0).
        adapter_spec = _bare_adapter_spec(
            method=ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL, output_prefix=" ", max_tokens=0
        )
        metric_specs = [MetricSpec(class_name="scenarios.lambada_metrics.LambadaLikelihoodMetric", args={})]
        metric_specs += get_generic_metric_specs()
        name_args = {"method": method.value}
    return RunSpec(
        name=_name("lambada", {**name_args, **source}),
        scenario_spec=scenario_spec,
        adapter_spec=adapter_spec,
        metric_specs=metric_specs,
        groups=["lambada"],
    )


@run_spec_function("wikitext")
def wikitext_run_spec(split: str | None = None, path: str | None = None) -> RunSpec:
    args = dict(split=split, path=path)
    return RunSpec(
        name=_name("wikitext", args),
        scenario_spec=_scenario_spec(WikiTextScenario, args),
        adapter_spec=get_language_modeling_adapter_spec(),
        metric_specs=get_language_modeling_metric_specs([])
        + [MetricSpec(class_name="scenarios.wikitext_metrics.WordPerplexityMetric", args={})],
        groups=["wikitext"],
    )


@run_spec_function("synthetic")
def synthetic_run_spec(num_prompts: int = 64, prompt_len: int = 512, output_len: int = 32, seed: int = 0) -> RunSpec:
    """FlexGen's benchmark workload; defaults are the paper's prompt 512 / output 32."""
    num_prompts = as_int("synthetic", "num_prompts", num_prompts, minimum=1)
    prompt_len = as_int("synthetic", "prompt_len", prompt_len, minimum=1)
    output_len = as_int("synthetic", "output_len", output_len, minimum=1)
    seed = as_int("synthetic", "seed", seed)
    scenario_args = dict(num_prompts=num_prompts, prompt_len=prompt_len, seed=seed)
    return RunSpec(
        name=_name(
            "synthetic",
            dict(num_prompts=num_prompts, prompt_len=prompt_len, output_len=output_len, seed=seed or None),
        ),
        scenario_spec=_scenario_spec(SyntheticScenario, scenario_args),
        adapter_spec=_bare_adapter_spec(method=ADAPT_GENERATION, max_tokens=output_len),
        metric_specs=get_basic_generation_metric_specs([]) + get_generic_metric_specs(),
        groups=["synthetic"],
    )


def build_run_specs(description: str) -> list[RunSpec]:
    """HELM's `construct_run_specs` for a description such as `lambada:method=greedy,model=...`,
    raising `ScenarioArgumentError` (with the names it knows) for an unknown scenario or argument."""
    from helm.benchmark.run_expander import RUN_EXPANDERS
    from helm.benchmark.run_spec import _REGISTERED_RUN_SPEC_FUNCTIONS
    from helm.benchmark.run_spec_factory import construct_run_specs
    from helm.common.object_spec import parse_object_spec

    try:
        spec = parse_object_spec(description)
    except ValueError as e:
        raise ScenarioArgumentError(f"{description!r}: {e} (expected name:key=value,...)") from e
    function = get_run_spec_function(spec.class_name)  # also loads HELM's own run-spec functions
    if function is None:
        close = difflib.get_close_matches(spec.class_name, list(_REGISTERED_RUN_SPEC_FUNCTIONS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ScenarioArgumentError(f"unknown scenario {spec.class_name!r}{hint}")
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [k for k in spec.args if k not in parameters and k not in RUN_EXPANDERS]
    if unknown and not takes_any:
        raise ScenarioArgumentError(
            f"{spec.class_name}: unknown argument(s) {', '.join(unknown)}; it takes {', '.join(parameters) or 'none'}"
        )
    missing = [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD and name not in spec.args
    ]
    if missing:
        raise ScenarioArgumentError(f"{spec.class_name}: missing argument(s) {', '.join(missing)}")
    return construct_run_specs(spec)
