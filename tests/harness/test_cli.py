"""`flexhelm generate`: plain and JSON output, and clear errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.cli import main


def test_generate_plain_prints_the_text(tiny_opt, capsys):
    path, _ = tiny_opt("pre")
    assert main(["generate", "--model", str(path), "--prompt", "the quick brown", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the quick brown") and len(out.strip()) > len("the quick brown")
    assert "tok/s" in err


def test_generate_json_has_ids_logprobs_and_totals(tiny_opt, tmp_path, capsys):
    path, _ = tiny_opt("350m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the lazy dog\n\nsea shells by\nall that\n")
    argv = ["generate", "--model", str(path), "--prompts-file", str(prompts), "--max-new-tokens", "6",
            "--batch-size", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["prompt"] for p in out["prompts"]] == ["the lazy dog", "sea shells by", "all that"]
    for p in out["prompts"]:
        assert p["prompt_ids"] and len(p["output_ids"]) == len(p["logprobs"]) <= 6
        assert all(lp <= 0 for lp in p["logprobs"])
        assert isinstance(p["output_text"], str)
    for key in ("prefill_s", "decode_s", "generated_tokens", "throughput_tok_s"):
        assert key in out
    assert out["generated_tokens"] >= 1


def test_generate_json_contract_holds_for_the_llama_family(tiny_llama, tmp_path, capsys):
    """Per prompt `output_ids` up to but excluding EOS (any of the config's), `logprobs` of the raw next-token
    distribution at each emitted token."""
    import torch

    from tests.runtime.test_llama import hf_trace

    path, model = tiny_llama("llama3")  # eos [1, 2]
    prompts = tmp_path / "p.txt"
    prompts.write_text("the lazy dog\nsea shells by\n")
    argv = ["generate", "--model", str(path), "--prompts-file", str(prompts), "--max-new-tokens", "8", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for p in out["prompts"]:
        ids = p["output_ids"]
        assert not {1, 2} & set(ids) and len(ids) == len(p["logprobs"]) <= 8
        trace = hf_trace(model, p["prompt_ids"], ids[:-1] if ids else [])
        want = [torch.log_softmax(trace[0][-1], -1)[ids[0]].item()] if ids else []
        want += [torch.log_softmax(t, -1)[tok].item() for t, tok in zip(trace[1:], ids[1:])]
        assert p["logprobs"] == pytest.approx(want, abs=1e-4)


def test_sampling_flags_are_seeded(tiny_opt, capsys):
    path, _ = tiny_opt("pre")
    argv = ["generate", "--model", str(path), "--prompt", "she sells", "--temperature", "1.0", "--top-k", "50",
            "--top-p", "0.9", "--seed", "3", "--json"]
    main(argv)
    a = json.loads(capsys.readouterr().out)["prompts"][0]["output_ids"]
    main(argv)
    assert json.loads(capsys.readouterr().out)["prompts"][0]["output_ids"] == a


@pytest.mark.parametrize("extra,match", [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--batch-size", "0"], "gpu_batch_size must be an integer >= 1"),
    (["--max-new-tokens", "500"], "exceeds the model's 96 positions"),
])
def test_errors_are_one_clear_line(tiny_opt, capsys, extra, match):
    path, _ = tiny_opt("pre")
    assert main(["generate", "--model", str(path), "--prompt", "the fox", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexhelm: error:") and match in err


def test_missing_model_folder(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_importing_harness_does_not_import_torch():
    code = "import harness.cli, runtime, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_generate_with_percent_policy_and_offload_dir(tiny_opt, tmp_path, capsys):
    path, _ = tiny_opt("pre")
    base = ["generate", "--model", str(path), "--prompt", "the quick brown", "--max-new-tokens", "6", "--json"]
    assert main(base) == 0
    ref = json.loads(capsys.readouterr().out)
    argv = base + ["--percent", "30", "20", "0", "0", "100", "0", "--offload-dir", str(tmp_path), "--no-overlap"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["prompts"][0]["output_ids"] == ref["prompts"][0]["output_ids"]
    assert out["policy"]["weights"] == {"device": 0.3, "host": 0.2} and out["policy"]["overlap"] is False
    assert out["weight_bytes_by_tier"]["disk"] > 0 and out["peak_memory"]["disk"] > 0
    assert "device fractions count as host RAM" in captured.err
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"gpu_batch_size": 2, "cache": {"disk": 1.0}}))
    assert main(base + ["--policy", str(policy), "--offload-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"][0]["output_ids"] == ref["prompts"][0]["output_ids"]
    assert main(base + ["--policy", '{"weights": {"device": 0.7, "host": 0.7}}']) == 2
    assert "exceed 1" in capsys.readouterr().err


def test_generate_with_compression_flags(tiny_opt, capsys):
    path, _ = tiny_opt("pre")
    base = ["generate", "--model", str(path), "--prompt", "the quick brown", "--max-new-tokens", "4", "--json"]
    assert main(base + ["--compress-weight", "--compress-cache", "--bits", "8", "--group-size", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"]["compress_weight"] == {"bits": 8, "group_size": 16, "axis": "input", "method": "minmax"}
    assert out["policy"]["compress_cache"]["bits"] == 8 and len(out["prompts"][0]["output_ids"]) >= 1
    assert main(base + ["--bits", "4"]) == 2
    assert "add --compress-weight" in capsys.readouterr().err
    assert main(base + ["--compress-weight", "--bits", "5"]) == 2
    assert "bits must be 2, 3, 4 or 8" in capsys.readouterr().err
    assert main(base + ["--compute", "int8", "--policy", "{}"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"]["compute"] == "int8"
    for policy in (["--policy", "{}"], ["--policy", "auto"]):
        assert main(base + ["--compute", "int8", "--compress-weight", *policy]) == 2
        assert "does not combine with compress_weight" in capsys.readouterr().err
    assert main(base + ["--compute", "any", "--policy", "{}"]) == 2
    assert "lets the `auto` policy choose" in capsys.readouterr().err
