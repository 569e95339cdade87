"""Benchmarks (`flexhelm bench NAME`): side-by-side ratios against a baseline, measured in one run.

The rules (BENCHMARKS.md): the machine is shared and noisy, so every reported figure is a ratio of
ours to a baseline measured alternately in the same run, or a fraction of a roofline measured in the
same run; absolute tokens/s are printed for the record only. Importing this package stays cheap: torch
and transformers are imported when a workload runs.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import replace
from pathlib import Path

from harness.bench.workloads import BY_NAME

WORKLOADS: dict[str, str] = {name: w.description for name, w in BY_NAME.items()}

# Benchmarks never download: the models are built locally (harness/planning/random_models.py). Set before
# transformers loads.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(name: str, out_dir: Path = Path("results/bench"), quick: bool = False, setups: tuple[str, ...] = ()) -> str:
    """Run workload `name`, write `<out_dir>/<name>.csv` (and `.png`), print and return the summary line.

    `quick` shrinks the workload to a tiny model and a few tokens (same code path) for smoke tests;
    `setups` picks a part of a workload made of several (W4: W1c, W2).
    """
    if name not in BY_NAME:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BY_NAME))}")
    os.environ.update(_OFFLINE_ENV)
    workload = BY_NAME[name].shrink() if quick else BY_NAME[name]
    workload = replace(workload, setups=tuple(setups))
    # heavy imports (torch, transformers) only once a workload runs
    module = importlib.import_module(f"harness.bench.{workload.module}")
    return module.run(workload, Path(out_dir))


__all__ = ["WORKLOADS", "run"]
