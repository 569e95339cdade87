"""Make crfm-helm run offline: call `prepare()` once, before anything imports `helm`.

HELM reaches for the network in three places that have nothing to do with the scenario being run:
the Hugging Face hub (tokenizers and datasets, unless the offline variables are set), NLTK's Punkt
download (`helm.benchmark.metrics.nltk_helper.install_nltk_resources()` runs when the metrics modules
are imported, for every run), and, indirectly, a torchvision wheel that no longer matches torch, which
makes `import transformers` fail with an error that names neither package.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_NLTK_DATA = Path("~/.cache/flexhelm/nltk_data")
PUNKT = "tokenizers/punkt_tab/english"


class HelmEnvironmentError(RuntimeError):
    """The Python environment cannot run HELM offline; the message says what to change."""


def prepare(nltk_data: str | os.PathLike | None = None) -> Path | None:
    """Set the offline variables, make NLTK's Punkt model resolvable locally, and refuse a broken torchvision.

    Returns the Punkt folder this call created, or None when one was already found. `nltk_data` defaults
    to the first entry of NLTK_DATA, else ~/.cache/flexhelm/nltk_data.
    """
    for key in OFFLINE_ENV:
        os.environ.setdefault(key, "1")
    check_torchvision()
    return ensure_punkt(nltk_data)


def check_torchvision() -> None:
    """Raise a clear error when torchvision is installed but cannot be imported.

    transformers imports torchvision whenever it is installed, so a wheel built for another torch (the only
    one crfm-helm pulls on some machines) breaks every tokenizer load deep inside HELM.
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # any failure here (ImportError, RuntimeError from its C++ ops) is the same problem
        raise HelmEnvironmentError(
            f"torchvision is installed but fails to import ({type(e).__name__}: {e}); transformers, and so HELM, "
            "cannot load with it. Nothing in flexhelm needs torchvision: run `pip uninstall torchvision`."
        ) from e


def ensure_punkt(nltk_data: str | os.PathLike | None = None) -> Path | None:
    """Create an empty Punkt model where `nltk.data.find("tokenizers/punkt_tab/english")` looks, if none exists.

    An empty model splits sentences at every period (no learned abbreviations); HELM only needs it for
    sentence splitting inside some metrics (ROUGE-Lsum, bias), which differ slightly from a run with the
    real model. Install the real `punkt_tab` into NLTK_DATA to get identical numbers.
    """
    root = Path(nltk_data) if nltk_data else _nltk_root()
    root = root.expanduser().resolve()
    paths = [str(root)] + [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p and p != str(root)]
    os.environ["NLTK_DATA"] = os.pathsep.join(paths)
    import nltk.data

    if str(root) not in nltk.data.path:  # nltk reads NLTK_DATA once, at import
        nltk.data.path.insert(0, str(root))
    try:
        nltk.data.find(PUNKT)
        return None
    except LookupError:
        pass
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    target = root / PUNKT
    target.parent.mkdir(parents=True, exist_ok=True)
    save_punkt_params(PunktParameters(), dir=str(target))  # creates `target` itself, private (0700)
    nltk.data.find(PUNKT)  # fails loudly here rather than inside HELM's metrics import
    return target


def _nltk_root() -> Path:
    configured = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    return Path(configured[0]) if configured else DEFAULT_NLTK_DATA
