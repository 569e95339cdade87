"""Where scenario data lives, and reading it with errors that name the file and line.

Two places: the data shipped inside the package (`scenarios/data/`, see its PROVENANCE.md) and the
user's data folder for what cannot be shipped (HELM's own scenario files), `$FLEXHELM_DATA` or
`~/.flexhelm/data` when unset. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scenarios.errors import ScenarioDataError

SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "data"
"""Data shipped with the package (LAMBADA, WikiText-2 raw, two MMLU subjects)."""

DATA_DIR_ENV = "FLEXHELM_DATA"
"""Environment variable naming the user's data folder."""

DEFAULT_USER_DATA_DIR = "~/.flexhelm/data"
"""The user's data folder when `$FLEXHELM_DATA` is unset."""


def user_data_dir() -> Path:
    """The user's data folder (need not exist)."""
    return Path(os.path.expanduser(os.environ.get(DATA_DIR_ENV) or DEFAULT_USER_DATA_DIR))


def require_file(path: str | os.PathLike, what: str) -> Path:
    """`path` if it is a file, else a `ScenarioDataError` saying what was expected there."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ScenarioDataError(f"{what}: no such file {p}")
    return p


def read_jsonl_field(path: Path, field: str) -> list[str]:
    """The string `field` of every non-blank line of a jsonl file, in order."""
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScenarioDataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ScenarioDataError(f"{path}:{lineno}: expected an object with a string field {field!r}")
            texts.append(record[field])
    return texts


SHIPPED_WIKITEXT = {
    "test": SHIPPED_DATA_DIR / "wikitext-2-raw" / "wiki.test.raw",
    "valid": SHIPPED_DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw",
}


def is_article_heading(line: str) -> bool:
    """` = Title = ` (an article) but not ` = = Section = = `."""
    stripped = line.strip()
    return stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")


def split_articles(text: str) -> list[str]:
    """The documents of a WikiText raw file, each from its heading line up to the next heading."""
    documents: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        if is_article_heading(line) and lines:
            documents.append("\n".join(lines))
            lines = []
        lines.append(line)
    documents.append("\n".join(lines))
    return [doc for doc in documents if doc.strip()]
