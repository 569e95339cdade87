"""Fixtures for scenario tests: offline NLTK data for HELM's metrics, HELM's downloads served offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def offline_nltk(tmp_path_factory):
    """An empty Punkt model where `nltk.data.find("tokenizers/punkt_tab")` looks.

    HELM's metric modules call `nltk.download("punkt_tab")` at import unless it is found; the tests never
    split sentences, so empty parameters suffice (`harness.helm.env.ensure_punkt` does this for the product;
    kept separate here so these tests need nothing from the harness).
    """
    root = tmp_path_factory.mktemp("nltk_data")
    # nltk only writes inside its data path (nltk.pathsec), and reads NLTK_DATA when nltk.data is imported.
    os.environ["NLTK_DATA"] = str(root)
    if "nltk.data" in sys.modules:
        sys.modules["nltk.data"].path.insert(0, str(root))
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    save_punkt_params(PunktParameters(), dir=str(english))
    return root


@pytest.fixture
def offline_helm(tmp_path, monkeypatch):
    """`scenarios.helm_offline` installed with an empty user data folder; yields that folder."""
    from scenarios import helm_offline

    data = tmp_path / "flexhelm_data"
    data.mkdir()
    monkeypatch.setenv("FLEXHELM_DATA", str(data))
    helm_offline.install()
    yield data
    helm_offline.uninstall()
