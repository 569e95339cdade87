"""Smoke test of the benchmark code path on a tiny model (the real workloads are run by `flexhelm bench`)."""

from __future__ import annotations

import re

import pytest

from harness.bench import WORKLOADS, run


def test_w1a_quick_runs_and_prints_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXHELM_CACHE", str(tmp_path / "cache"))
    summary = run("W1a", out_dir=tmp_path / "out", quick=True)
    assert re.fullmatch(r"W1a ours/hf=\d+\.\d\d roofline=\d+\.\d\d", summary)
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == summary  # the summary is the last line
    assert (tmp_path / "out" / "W1a.csv").is_file()
    assert (tmp_path / "cache" / "bench-models" / "opt-tiny" / "config.json").is_file()


def test_unknown_workload_lists_known_names():
    with pytest.raises(ValueError, match="W1a, W1b"):
        run("W9")
    assert set(WORKLOADS) == {"W1a", "W1b"}
