"""Checkpoint layouts load to identical logits; bad input gets a clear error naming file or value."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from runtime import CheckpointError, Engine, InputError, Policy, PolicyError
from runtime.checkpoint import Checkpoint, load_tokenizer
from tests.tiny_models import LAYOUTS

PROMPT = [[5, 6, 7, 8]]


def test_every_layout_loads_to_identical_logits(tiny_opt):
    ref = None
    for layout in LAYOUTS:
        path, _ = tiny_opt("pre", layout)
        files = {f.name for f in path.iterdir()}
        expected = {"safetensors": "model.safetensors", "sharded": "model.safetensors.index.json",
                    "bin": "pytorch_model.bin", "bin-sharded": "pytorch_model.bin.index.json"}[layout]
        assert expected in files, (layout, files)
        assert len([f for f in files if f.startswith("model") or f.startswith("pytorch")]) > (
            2 if layout.endswith("sharded") else 0)
        logits = Engine(path).trace_logits(PROMPT, [[9]])
        if ref is None:
            ref = logits
        for a, b in zip(ref, logits):
            assert torch.equal(a, b), layout


def test_spec_of_350m_style_config(tiny_opt):
    path, model = tiny_opt("350m")
    spec = Checkpoint(path).spec
    assert (spec.embed_dim, spec.hidden_size, spec.norm_before, spec.final_norm) == (24, 48, False, False)
    assert spec.num_parameters() == sum(p.numel() for p in model.parameters())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_config_weights_and_tokenizer(tiny_opt, tmp_path):
    src, _ = tiny_opt("pre")
    with pytest.raises(CheckpointError, match="does not exist"):
        Engine(tmp_path / "nope")
    d = _copy(src, tmp_path / "a")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        Engine(d)
    d = _copy(src, tmp_path / "b")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        Engine(d)
    d = _copy(src, tmp_path / "c")
    for f in ("tokenizer.json", "vocab.json"):
        (d / f).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no tokenizer in"):
        load_tokenizer(d)
    assert load_tokenizer(src)("the fox")["input_ids"]


def test_truncated_and_corrupt_safetensors(tiny_opt, tmp_path):
    src, _ = tiny_opt("pre")
    d = _copy(src, tmp_path / "t")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        Engine(d)
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        Engine(d)
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt header"):
        Engine(d)


def test_read_error_names_the_file_and_offset(tiny_opt, tmp_path, monkeypatch):
    """EIO while reading a tensor (a failing disk): an error with the file and offset, never a zero tensor."""
    import errno
    import os

    src, _ = tiny_opt("pre")
    ckpt = Checkpoint(src)
    name = next(iter(ckpt._entries))

    def eio(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(CheckpointError, match=r"cannot read .*model.safetensors at offset \d+ \(\d+ bytes\): "
                                              r"Input/output error; the file or its disk is damaged"):
        ckpt.tensor(name)


def test_missing_shard_and_missing_tensor(tiny_opt, tmp_path):
    src, _ = tiny_opt("pre", "sharded")
    d = _copy(src, tmp_path / "s")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} .* is missing"):
        Engine(d)
    d = _copy(src, tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.decoder.layers.1.fc1.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="layers.1.fc1.weight' is missing"):
        Engine(d)


def test_unsupported_model_type_and_bad_config(tiny_opt, tmp_path):
    src, _ = tiny_opt("pre")
    d = _copy(src, tmp_path / "u")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'mamba'.*opt"):
        Engine(d)
    (d / "config.json").write_text(json.dumps({**cfg, "ffn_dim": 64}))
    with pytest.raises(CheckpointError, match="has shape .* config.json implies"):
        Engine(d)
    (d / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Engine(d)


@pytest.fixture(scope="module")
def engine(tiny_opt):
    return Engine(tiny_opt("pre")[0])


@pytest.mark.parametrize("call,match", [
    (lambda e: e.generate([], 4), "non-empty list"),
    (lambda e: e.generate([[]], 4), r"prompts\[0\] is empty"),
    (lambda e: e.generate([[1, 2]], 0), "max_new_tokens must be a positive integer"),
    (lambda e: e.generate([[1, 2]], -3), "max_new_tokens must be a positive integer"),
    (lambda e: e.generate([[1] * 90], 10), r"prompt 0 \(90 tokens\).* exceeds the model's 96 positions"),
    (lambda e: e.generate([[1, 999]], 4), "token id 999 outside the vocabulary"),
    (lambda e: e.generate(["hello"], 4), "list of int token ids"),
    (lambda e: e.generate([[1]], 4, temperature=-1), "temperature must be >= 0"),
    (lambda e: e.generate([[1]], 4, top_p=0), "top_p must be in"),
    (lambda e: e.score([[1]], [[2], [3]]), "1 contexts but 2 continuations"),
    (lambda e: e.score([[1] * 90], [[2] * 10]), "exceeds the model's 96 positions"),
    (lambda e: e.score_rolling([[1, 2]], window=200), "window 200 = 200 tokens exceeds"),
    (lambda e: e.score_rolling([[1, 2]], window=8, stride=9), "stride must be in"),
])
def test_bad_requests(engine, call, match):
    with pytest.raises(InputError, match=match):
        call(engine)


def test_bad_policies():
    with pytest.raises(PolicyError, match="gpu_batch_size must be an integer >= 1"):
        Policy(gpu_batch_size=0)
    with pytest.raises(PolicyError, match="num_gpu_batches"):
        Policy(num_gpu_batches=-1)
    with pytest.raises(PolicyError, match="weight_format must be one of"):
        Policy(weight_format="int3")
    if not torch.cuda.is_available():
        from runtime.device import resolve_device

        with pytest.raises(PolicyError, match="no CUDA device"):
            resolve_device("cuda")


def test_loading_keeps_one_copy_of_the_model(tmp_path):
    """Peak RSS while loading an fp16 checkpoint into fp32 grows by the fp32 weights plus one tensor, not 2x."""
    from runtime.device import PeakMemory, read_status
    from tests.tiny_models import build_opt

    build_opt(tmp_path, "pre", dtype=torch.float16, hidden_size=512, num_hidden_layers=6, ffn_dim=2048,
              num_attention_heads=8)
    import gc

    gc.collect()
    before = read_status("VmRSS")
    PeakMemory(torch.device("cpu")).reset()
    engine = Engine(tmp_path)
    grown = PeakMemory(torch.device("cpu")).read()["host"] - before
    assert engine.weights.nbytes > 60e6
    assert grown < engine.weights.nbytes * 1.15 + 20e6, (grown, engine.weights.nbytes)


def test_truncated_bin_checkpoint(tiny_opt, tmp_path):
    src, _ = tiny_opt("pre", "bin")
    d = _copy(src, tmp_path / "b")
    f = d / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read .*pytorch_model.bin"):
        Engine(d)
