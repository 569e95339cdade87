"""Dependencies point one way (docs/DESIGN.md): the runtime imports nothing of the harness or the scenarios, and the
product imports nothing of the benchmarks but for the `flexhelm bench` command, which loads them when it runs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, at its top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.extend([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
    return out


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_runtime_imports_neither_the_harness_nor_the_scenarios():
    bad = [(p.relative_to(ROOT), m) for p in _modules("runtime") for m in _imports(p)
           if m.split(".")[0] in ("harness", "scenarios")]
    assert bad == []


def test_only_the_bench_command_imports_the_benchmarks():
    users = [(str(p.relative_to(ROOT)), m) for folder in ("runtime", "harness", "scenarios") for p in _modules(folder)
             if "bench" not in p.relative_to(ROOT).parts for m in _imports(p)
             if m == "harness.bench" or m.startswith("harness.bench.")]
    assert users == [("harness/cli.py", "harness.bench")]
