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
    import torch

    built = {}

    def get(variant="pre", layout="safetensors", dtype=torch.float32):
        key = (variant, layout, dtype)
        if key not in built:
            out = tmp_path_factory.mktemp(f"opt-{variant}-{layout}")
            built[key] = (out, tiny_models.build_opt(out, variant, layout, dtype, tokenizer=tokenizer_dir))
        return built[key]

    return get
