"""Fixtures of the suite tests (test_runner.py, test_reliability.py)."""

from __future__ import annotations

import pytest

from tests.harness.fake_runtime import SCENARIOS_VARIANTS, suite_text


@pytest.fixture
def nltk_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NLTK_DATA", str(tmp_path_factory.getbasetemp() / "nltk"))


@pytest.fixture
def suite_file(tmp_path, tiny_opt):
    folder, _ = tiny_opt()
    path = tmp_path / "suite.yaml"
    path.write_text(suite_text("fake", folder, SCENARIOS_VARIANTS))
    return path
