"""The HELM plugin registers local checkpoints, and `helm-run` / `helm-summarize` work end to end on one."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("helm")

from tests import tiny_models  # noqa: E402

BIN = Path(sys.executable).parent
RUN_FILES = ("run_spec.json", "scenario_state.json", "stats.json", "per_instance_stats.json")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NLTK_DATA", str(tmp_path_factory.mktemp("nltk")))  # importing registers: keep it out of ~/.cache
    mp.delenv("FLEXHELM_MODELS", raising=False)
    import harness.helm.plugin as plugin

    yield plugin
    mp.undo()


@pytest.fixture(scope="module")
def model_512(tmp_path_factory, tokenizer_dir):
    """A tiny OPT with room for few-shot prompts (the shared ones have 96 positions)."""
    out = tmp_path_factory.mktemp("opt-512")
    tiny_models.build_opt(out, tokenizer=tokenizer_dir, max_position_embeddings=512)
    return out


def test_models_from_env(plugin, tiny_opt):
    folder, _ = tiny_opt()
    assert plugin.models_from_env(f" a={folder} , b.2={folder}") == {"a": folder.resolve(), "b.2": folder.resolve()}
    assert plugin.models_from_env("") == {}
    for bad in ("nofolder", f"a/b={folder}", "a=/does/not/exist", f"a={folder},a={folder}"):
        with pytest.raises(plugin.PluginError):
            plugin.models_from_env(bad)


def test_register_model(plugin, tiny_opt):
    from helm.benchmark.model_deployment_registry import get_model_deployment
    from helm.benchmark.model_metadata_registry import (
        FULL_FUNCTIONALITY_TEXT_MODEL_TAG,
        TEXT_MODEL_TAG,
        get_model_metadata,
    )
    from helm.benchmark.tokenizer_config_registry import get_tokenizer_config

    folder, _ = tiny_opt()
    name = plugin.register_model("reg-test", folder, policy='{"gpu_batch_size": 4}', max_batch=32)
    assert name == "flexhelm/reg-test"
    d = get_model_deployment(name)
    assert d.client_spec.class_name == "harness.helm.client.FlexhelmClient"
    assert d.client_spec.args["model_dir"] == str(folder.resolve()) and d.client_spec.args["max_batch"] == 32
    assert json.loads(d.client_spec.args["policy"])["gpu_batch_size"] == 4
    assert (d.max_sequence_length, d.max_request_length) == (96, 97)
    assert {TEXT_MODEL_TAG, FULL_FUNCTIONALITY_TEXT_MODEL_TAG} <= set(get_model_metadata(name).tags)
    tok = get_tokenizer_config(d.tokenizer_name)
    assert tok.prefix_token == tok.end_of_text_token == "</s>"
    assert tok.tokenizer_spec.args["pretrained_model_name_or_path"] == str(folder.resolve())
    assert plugin.register_model("reg-test", folder, policy='{"gpu_batch_size": 4}', max_batch=32) == name
    with pytest.raises(plugin.PluginError, match="already registered"):
        plugin.register_model("reg-test", folder)
    with pytest.raises(Exception, match="unknown policy fields"):
        plugin.register_model("bad-policy", folder, policy='{"batch": 4}')


def _helm_entry_points(cwd: Path) -> list[str]:
    """`helm` entry points as a console script sees them (a fresh process, away from the repo, whose stale
    `flexhelm.egg-info` would shadow the installed metadata when the repo root is on sys.path)."""
    code = "import importlib.metadata as m; print(*[e.value for e in m.entry_points(group='helm')])"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True).stdout.split()


def test_helm_entry_point_is_installed(tmp_path):
    try:
        importlib.metadata.distribution("flexhelm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("flexhelm is not installed as a distribution (pip install -e .)")
    assert "harness.helm.plugin" in _helm_entry_points(tmp_path)


@pytest.mark.skipif(shutil.which("helm-run", path=str(BIN)) is None, reason="helm-run is not installed")
@pytest.mark.parametrize("runner", ["threads", "batch_runner"])
def test_helm_run_and_summarize(model_512, tmp_path, runner):
    entries = ["synthetic_reasoning:mode=pattern_match,model=flexhelm/tiny"]
    if importlib.util.find_spec("scenarios.helm_offline") is not None:
        entries.append("mmlu:subject=abstract_algebra,model=flexhelm/tiny")
    env = {**os.environ, "FLEXHELM_MODELS": f"tiny={model_512}", "NLTK_DATA": str(tmp_path / "nltk"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(BIN / "helm-run"), "-r", *entries, "--suite", "t", "-o", str(tmp_path / "out"),
           "--local-path", str(tmp_path / "prod_env"), "-m", "4", "--disable-cache"]
    if runner == "threads":
        cmd += ["-n", "4"]  # each thread's request joins one batch
        if "harness.helm.plugin" not in _helm_entry_points(tmp_path):  # else plain helm-run finds it
            cmd += ["--plugins", "harness.helm.plugin"]
    else:
        cmd += ["--plugins", "harness.helm.plugin", "--runner-class-name", "harness.helm.client.BatchRunner"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = tmp_path / "out" / "runs" / "t"
    folders = sorted(p for p in runs.iterdir() if p.is_dir() and "model=flexhelm_tiny" in p.name)
    assert len(folders) == len(entries), run.stdout[-3000:]
    for folder in folders:
        assert all((folder / f).is_file() for f in RUN_FILES), folder
        states = json.loads((folder / "scenario_state.json").read_text())["request_states"]
        sizes = [s["result"]["batch_size"] for s in states]
        assert all(s["result"]["success"] for s in states)
        assert max(sizes) > 1, f"{folder.name}: requests reached the engine one at a time: {sizes}"
        if runner == "batch_runner":
            assert sizes == [len(states)] * len(states)
        stats = {s["name"]["name"] for s in json.loads((folder / "stats.json").read_text())}
        assert {"batch_size", "inference_runtime", "inference_denoised_runtime"} <= stats
    if runner == "batch_runner":
        return  # one summarize is enough: both runners write the same layout
    summarize = subprocess.run([str(BIN / "helm-summarize"), "--suite", "t", "-o", str(tmp_path / "out")],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert summarize.returncode == 0, summarize.stdout[-3000:] + summarize.stderr[-3000:]
    assert (runs / "summary.json").is_file() and (runs / "runs.json").is_file()
