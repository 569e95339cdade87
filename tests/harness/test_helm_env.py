"""`harness.helm.env.prepare()` removes HELM's network traps and names a broken torchvision."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from harness.helm import env


@pytest.fixture
def clean_nltk_path(monkeypatch):
    nltk_data = pytest.importorskip("nltk.data")
    monkeypatch.setattr(nltk_data, "path", list(nltk_data.path))
    return nltk_data


def test_prepare_sets_offline_variables_and_creates_punkt_once(tmp_path, monkeypatch, clean_nltk_path):
    for key in env.OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user's explicit choice stays
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk"))
    monkeypatch.setattr(env, "check_torchvision", lambda: None)
    created = env.prepare()
    if created is None:
        pytest.skip("a real punkt_tab is installed on this machine")
    assert created == (tmp_path / "nltk" / env.PUNKT).resolve()
    assert {k: os.environ[k] for k in env.OFFLINE_ENV} == {
        "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert clean_nltk_path.find("tokenizers/punkt_tab/english")
    assert env.prepare() is None  # found now: nothing to create

    from nltk.tokenize import sent_tokenize

    assert sent_tokenize("One sentence. Another one.") == ["One sentence.", "Another one."]


def test_punkt_goes_to_the_given_folder_first_on_nltk_data(tmp_path, monkeypatch, clean_nltk_path):
    monkeypatch.setenv("NLTK_DATA", "/elsewhere")
    created = env.ensure_punkt(tmp_path)
    if created is None:
        pytest.skip("a real punkt_tab is installed on this machine")
    assert created == (tmp_path / env.PUNKT).resolve()
    assert os.environ["NLTK_DATA"].split(os.pathsep) == [str(tmp_path.resolve()), "/elsewhere"]


def test_broken_torchvision_is_named_with_the_fix(tmp_path, monkeypatch):
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    importlib.invalidate_caches()
    with pytest.raises(env.HelmEnvironmentError, match="pip uninstall torchvision"):
        env.check_torchvision()


def test_no_torchvision_is_fine(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    env.check_torchvision()
