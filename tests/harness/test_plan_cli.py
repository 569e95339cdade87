"""`flexhelm plan`, `flexhelm profile` and the `auto` policy of `flexhelm generate`."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.planning.auto_policy import parse_size
from tests.runtime.cost_fixtures import GiB, cpu_hardware, table_params

OPT_175B = {"model_type": "opt", "hidden_size": 12288, "num_hidden_layers": 96, "num_attention_heads": 96,
            "ffn_dim": 49152, "vocab_size": 50272, "max_position_embeddings": 2048, "torch_dtype": "float16"}


@pytest.fixture
def opt175b(tmp_path):
    """OPT-175B's config.json alone: planning reads no weights."""
    folder = tmp_path / "opt-175b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(OPT_175B))
    return folder


@pytest.fixture
def cpu_json(tmp_path):
    return cpu_hardware(device_mem=8 * GiB).save(tmp_path / "cpu.json")


def test_plan_opt175b_on_flexgens_t4(opt175b, capsys):
    argv = ["plan", "--model", str(opt175b), "--prompt-len", "512", "--gen-len", "32", "--hardware", "t4_flexgen"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for what in ("policy:", "predicted throughput:", "memory per tier", "bottleneck:", "binding constraint:"):
        assert what in out
    assert main(argv + ["--compress", "both", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["policy"]["compress_weight"]["bits"] == 4 and plan["throughput_tok_s"] > 0
    assert all(plan["memory_bytes"][t] <= plan["capacity_bytes"][t] for t in ("device", "host", "disk"))


@pytest.mark.parametrize("name", ["llama-3-70b", "qwen2.5-72b"])
def test_plan_llama_family_from_config_alone_on_flexgens_t4(name, tmp_path, capsys):
    from harness.planning.random_models import config_dir, spec

    folder = config_dir(name, tmp_path / name)
    argv = ["plan", "--model", str(folder), "--prompt-len", "512", "--gen-len", "32", "--hardware", "t4_flexgen",
            "--json"]
    plans = {}
    for compress in ("none", "both"):
        assert main(argv + ["--compress", compress]) == 0
        plans[compress] = plan = json.loads(capsys.readouterr().out)
        assert plan["throughput_tok_s"] > 0
        assert all(plan["memory_bytes"][t] <= plan["capacity_bytes"][t] for t in ("device", "host", "disk"))
    # 70B parameters: in fp16 (140 GB) they fill the T4's 208 GB of RAM with the cache, 4-bit leaves room for more
    assert spec(name).num_parameters() > 70e9
    assert plans["both"]["policy"]["compress_weight"]["bits"] == 4
    assert plans["both"]["throughput_tok_s"] > plans["none"]["throughput_tok_s"]


def test_plan_honours_memory_limits_and_explains_infeasible(opt175b, capsys):
    base = ["plan", "--model", str(opt175b), "--prompt-len", "512", "--gen-len", "32", "--hardware", "t4_flexgen"]
    assert main(base + ["--host-mem", "100GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_bytes"]["host"] <= 100 * GiB
    assert main(base + ["--host-mem", "100GiB", "--disk-mem", "50GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexhelm: error: no policy fits") and "binding tier is" in err and "smallest" in err


def test_generate_auto_keeps_a_small_model_in_memory(tiny_opt, cpu_json, capsys):
    path, _ = tiny_opt("pre")
    argv = ["generate", "--model", str(path), "--prompt", "the quick brown", "--max-new-tokens", "5", "--json"]
    assert main(argv) == 0  # the test suite's default policy: the fixed one
    ref = json.loads(capsys.readouterr().out)
    assert main(argv + ["--policy", "auto", "--hardware", str(cpu_json), "--host-mem", "4GiB"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "auto policy:" in captured.err
    assert out["prompts"][0]["output_ids"] == ref["prompts"][0]["output_ids"]
    assert out["policy"]["weights"] == out["policy"]["cache"] == {"device": 1.0, "host": 0.0}
    assert out["weight_bytes_by_tier"]["disk"] == 0


def test_generate_auto_keeps_fixed_flags(tiny_opt, cpu_json, capsys):
    path, _ = tiny_opt("pre")
    argv = ["generate", "--model", str(path), "--prompt", "the quick brown", "--max-new-tokens", "3", "--json",
            "--policy", "auto", "--hardware", str(cpu_json), "--batch-size", "3", "--compress-weight"]
    assert main(argv) == 0
    policy = json.loads(capsys.readouterr().out)["policy"]
    assert policy["gpu_batch_size"] == 3 and policy["compress_weight"]["bits"] == 4


def test_sizes_parse_with_units():
    assert parse_size("6GiB") == 6 * GiB and parse_size("6G") == 6 * 10**9 and parse_size("512MiB") == 2**29
    assert parse_size("6e9") == 6 * 10**9
    with pytest.raises(Exception, match="not a size"):
        parse_size("six gigs")


def test_harness_backend_plans_auto_for_the_model(tiny_opt, cpu_json, monkeypatch):
    from harness.helm import backend
    from harness.helm.backend import policy_from

    path, _ = tiny_opt("pre")
    monkeypatch.setenv("FLEXHELM_HARDWARE", str(cpu_json))
    monkeypatch.setattr(backend, "_AUTO_PLANS", {})
    policy = policy_from("auto", path)
    assert policy.weights.device == policy.cache.device == 1.0
    monkeypatch.setenv("FLEXHELM_DEFAULT_POLICY", "auto")
    assert policy_from(None, path) == policy


def test_profile_writes_a_spec_and_fit_calibrates_it(tmp_path, monkeypatch, capsys):
    from harness.planning.calibrate import fit
    from runtime.hardware import HardwareSpec

    monkeypatch.setenv("FLEXHELM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "hw.json"
    assert main(["profile", "--out", str(out), "--offload-dir", str(tmp_path / "scratch")]) == 0
    hw = HardwareSpec.load(out)
    assert not hw.accelerator and hw.host_mem == 0 and hw.device_mem > 0 and hw.disk_to_host > 0
    assert hw.matmul_rate("float32", 2048) > hw.matmul_rate("float32", 1) > 0
    assert hw.matmul_rate("int8", 2048) > hw.matmul_rate("int8", 1) > 0  # through `Int8Weight.matmul`
    for model in ("opt-tiny", "llama-tiny"):  # the fit runs any family
        calibrated = fit(hw, model=model, log=lambda s: None)
        assert calibrated.calibration.compute > 0 and calibrated.calibration.call_overhead_s >= 0


def test_a_cached_profile_from_before_int8_gains_its_rates_once(tmp_path, monkeypatch):
    from dataclasses import replace

    from harness.planning.auto_policy import load_hardware
    from runtime.hardware import cached_path
    from tests.runtime.cost_fixtures import cpu_hardware

    monkeypatch.setenv("FLEXHELM_CACHE", str(tmp_path))
    monkeypatch.delenv("FLEXHELM_HARDWARE", raising=False)
    old = cpu_hardware()
    old.save(cached_path())
    hw = load_hardware(log=lambda s: None)
    assert hw.matmul["int8"][0][0] == 1 and replace(hw, matmul=old.matmul) == old
    assert "int8" in load_hardware(log=lambda s: None).matmul  # saved: measured once


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_planned_weight_fractions_are_what_the_runtime_keeps(tiny_opt, tiny_llama, tmp_path, family):
    """At each level `weight_levels` gives, the runtime keeps the bytes the cost model counts: that fraction of
    the weights, and the tables (kept in memory whatever the placement) in full."""
    from harness.planning.auto_policy import model_spec
    from runtime import Engine
    from runtime.policy import Placement, Policy
    from runtime.weights import weight_levels

    path, _ = tiny_opt("pre") if family == "opt" else tiny_llama("qwen2-bias")  # tied: the tables are the token's
    spec = model_spec(path)
    levels = weight_levels(spec)
    assert levels[0] == 0.0 and levels[-1] == 1.0 and len(levels) > 4  # the boundaries inside a layer
    import torch

    tables = getattr(torch, spec.torch_dtype).itemsize * table_params(spec)
    for f in levels:
        policy = Policy(device="cpu", weights=Placement(f, 0.0), weight_format="checkpoint")
        engine = Engine(path, policy, offload_dir=tmp_path)
        tiers = engine.weights.bytes_by_tier()
        total = sum(tiers.values())
        assert tiers["device"] == pytest.approx(f * total + (1 - f) * tables, rel=0.02, abs=64), f
        engine.close()
