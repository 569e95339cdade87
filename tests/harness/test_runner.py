"""The suite runner: HELM's layout, crash and rerun equal to an uninterrupted run, nothing finished recomputed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("helm")

from harness.suites.runner import SuiteRunner  # noqa: E402
from harness.suites.suite import load_suite  # noqa: E402
from tests.harness.fake_runtime import (  # noqa: E402
    SAME_FILES,
    SCENARIOS_VARIANTS,
    FakeRuntime,
    InjectedCrash,
    run_suite,
    suite_text,
)

pytestmark = pytest.mark.usefixtures("nltk_in_tmp")

HELM_FILES = ("run_spec.json", "scenario.json", "scenario_state.json", "stats.json", "per_instance_stats.json")
OUR_FILES = ("policy.json", "env.json", "runtime.json", "flexhelm_run.json", "run.log", "done.json")


def test_fake_suite_writes_helm_layout(suite_file, tmp_path):
    runtime = FakeRuntime()
    outcomes = run_suite(suite_file, tmp_path / "r", runtime)
    assert [o.status for o in outcomes] == ["done"] * 8
    for o in outcomes:
        folder = tmp_path / "r" / "fake" / o.run_id
        assert all((folder / f).is_file() for f in HELM_FILES + OUR_FILES), o.run_id
        assert json.loads((folder / "done.json").read_text())["key"] == json.loads(
            (folder / "flexhelm_run.json").read_text())["key"]
    lam = tmp_path / "r" / "fake" / "tiny--lambada--4bit--b3"
    states = json.loads((lam / "scenario_state.json").read_text())["request_states"]
    assert len(states) == 10 and {s["result"]["batch_size"] for s in states} == {3, 1}  # 10 = 3+3+3+1
    stats = {s["name"]["name"] for s in json.loads((lam / "stats.json").read_text())}
    assert "prompt_truncated" in stats  # scenario metrics ran (the tiny model's window truncates every passage)
    policy = json.loads((lam / "policy.json").read_text())
    assert policy["requested"] == "auto" and policy["policy"]["compress_weight"]["bits"] == 4
    assert policy["policy"]["compress_cache"] is None and policy["policy"]["gpu_batch_size"] == 3
    env = json.loads((lam / "env.json").read_text())
    assert env["packages"]["crfm-helm"] and env["hardware"]["cpu_count"] >= 1
    runtime_json = json.loads((lam / "runtime.json").read_text())
    assert runtime_json["engine_calls"] == 4 and runtime_json["requests"] == 10
    # a rerun of the same command skips every finished run and sends nothing
    again = FakeRuntime()
    assert [o.status for o in run_suite(suite_file, tmp_path / "r", again)] == ["skipped"] * 8
    assert again.processed == []


@pytest.mark.parametrize("crash_at", [0, 5, 23])
def test_crash_and_rerun_equal_an_uninterrupted_run(suite_file, tmp_path, crash_at):
    clean = FakeRuntime()
    run_suite(suite_file, tmp_path / "clean", clean)
    total = len(clean.processed)
    assert clean.batches > 23

    crashing = FakeRuntime(crash_at_batch=crash_at)
    with pytest.raises(InjectedCrash):
        run_suite(suite_file, tmp_path / "resumed", crashing)
    finished_before = len(crashing.processed)
    rerun = FakeRuntime()
    run_suite(suite_file, tmp_path / "resumed", rerun)

    # nothing finished before the crash is sent again, and everything else is sent exactly once
    assert len(rerun.processed) == total - finished_before
    assert not set(crashing.processed) & set(rerun.processed)
    for run_dir in sorted((tmp_path / "clean" / "fake").glob("tiny--*")):
        for name in SAME_FILES:
            resumed = tmp_path / "resumed" / "fake" / run_dir.name / name
            assert resumed.read_text() == (run_dir / name).read_text(), f"{run_dir.name}/{name}"


def test_edited_entry_reruns_and_reuses_the_cache(suite_file, tmp_path):
    run_suite(suite_file, tmp_path / "r", FakeRuntime())
    suite_file.write_text(suite_file.read_text().replace("max_instances: 10", "max_instances: 12"))
    rerun = FakeRuntime()
    outcomes = run_suite(suite_file, tmp_path / "r", rerun)
    assert [o.status for o in outcomes][:2] == ["done", "done"] and outcomes[2].status == "skipped"
    # the batches of 3 differ now ([0..2], [3..5], ...), but requests already answered come from the cache
    assert len(rerun.processed) < 2 * 12


def test_failed_run_is_reported_and_others_go_on(suite_file, tmp_path):
    class Broken(FakeRuntime):
        def __call__(self, model_dir, policy):
            if policy.compress_weight is not None:
                raise RuntimeError("no 4-bit today")
            return super().__call__(model_dir, policy)

    outcomes = run_suite(suite_file, tmp_path / "r", Broken())
    status = {o.run_id: o.status for o in outcomes}
    assert status["tiny--lambada--4bit--b3"] == "failed" and status["tiny--lambada--fp16--b3"] == "done"
    assert "no 4-bit today" in (tmp_path / "r" / "fake" / "tiny--lambada--4bit--b3" / "run.log").read_text()
    assert not (tmp_path / "r" / "fake" / "tiny--lambada--4bit--b3" / "done.json").exists()


def test_fast_json_matches_helms_asdict(suite_file, tmp_path):
    """Our writer's `to_tree` gives exactly HELM's `asdict_without_nones` on a real scenario state."""
    import dacite
    from helm.benchmark.adaptation.scenario_state import ScenarioState
    from helm.common.general import asdict_without_nones

    from harness.helm.json_io import to_tree

    run_suite(suite_file, tmp_path / "r", FakeRuntime())
    path = tmp_path / "r" / "fake" / "tiny--wikitext--fp16--b3" / "scenario_state.json"
    state = dacite.from_dict(ScenarioState, json.loads(path.read_text()))
    assert to_tree(state) == json.loads(json.dumps(asdict_without_nones(state)))


def test_a_suite_runs_on_a_llama_family_model(tmp_path, tokenizer_dir):
    """The real runtime under the runner (no fake): LAMBADA, WikiText and synthetic runs of a tiny Qwen2-shaped
    model (GQA, q/k/v biases, tied head), fp16 and 4-bit, in HELM's layout with their metrics."""
    from tests import tiny_models

    folder = tmp_path / "model"  # 512 positions: LAMBADA's passages fit, so they are scored
    tiny_models.build_llama(folder, "qwen2-bias", max_position_embeddings=512, tokenizer=tokenizer_dir)
    path = tmp_path / "suite.yaml"
    # its own model name: HELM's registry is per process, and `tiny` is the OPT model of the other tests
    path.write_text(suite_text("llama", folder, SCENARIOS_VARIANTS).replace("name: tiny\n", "name: qwen2-tiny\n"))
    outcomes = SuiteRunner(tmp_path / "r", progress=False).run(load_suite(path))
    assert [o.status for o in outcomes] == ["done"] * 8, [o.error for o in outcomes]
    means = {}
    for run in outcomes:
        run_dir = tmp_path / "r" / "llama" / run.run_id
        assert all((run_dir / f).is_file() for f in HELM_FILES + OUR_FILES), run_dir
        means[run.run_id] = {s["name"]["name"]: s.get("mean") for s in json.loads((run_dir / "stats.json").read_text())
                             if s["name"].get("split") == "test" and not s["name"].get("perturbation")}
    for variant in ("fp16", "4bit"):
        assert means[f"qwen2-tiny--lambada--{variant}--b3"]["prompt_truncated"] == 0.0
        assert 0.0 <= means[f"qwen2-tiny--lambada--{variant}--b3"]["lambada_accuracy"] <= 1.0
        assert means[f"qwen2-tiny--synthetic--{variant}--b4"]["num_output_tokens"] == 4
    ppl = [means[f"qwen2-tiny--wikitext--{v}--b3"]["perplexity"] for v in ("fp16", "4bit")]
    assert 1 < ppl[0] < 10 * 300 and ppl[1] != ppl[0] and abs(ppl[1] / ppl[0] - 1) < 0.2  # 4-bit: close, not equal
