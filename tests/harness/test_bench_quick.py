"""Smoke test of the benchmark code path on a tiny model (the real workloads are run by `flexhelm bench`)."""

from __future__ import annotations

import re

import pytest

from harness.bench import WORKLOADS, run

SUMMARY = {
    "W1a": r"W1a ours/hf=\d+\.\d\d roofline=\d+\.\d\d",
    "W1L": r"W1L ours/hf=\d+\.\d\d roofline=\d+\.\d\d",
    # accelerate is optional in quick mode: without it the baseline is skipped and the ratio is n/a
    "W2": r"W2 ours/accelerate=(\d+\.\d\d|n/a) roofline=\d+\.\d\d peak_rss_gb=\d+\.\d\d",
    "W2L": r"W2L ours/accelerate=(\d+\.\d\d|n/a) roofline=\d+\.\d\d peak_rss_gb=\d+\.\d\d",
    "W3": r"W3 4bit/fp16=\d+\.\d\d",
    "W1c": r"W1c ours/hf_best=(\d+\.\d\d|n/a)",
    "W4": r"W4 auto/best=(\d+\.\d\d|n/a) median_abs_pred_err=\d+\.\d\d",
    "quality": r"quality w4\+c4: ppl [+-]\d+\.\d\d% lambada_acc [+-]\d+\.\d\d points",
    "W5": r"W5 overhead=\d\.\d\d\d",
    "kernels": r"kernels int8/fp32 m=1:\d+\.\d\d m=8:\d+\.\d\d int8/int4 m=1:\d+\.\d\d m=8:\d+\.\d\d",
    # quick mode runs ours only, on the shipped reference model (both peers run the SmolLM2 GGUF)
    "W6": r"W6 ours/llamacpp=n/a ours4/llamacpp=n/a ours8/llamacpp=n/a acc_ours=\d\.\d{4} acc_ours8=\d\.\d{4} "
          r"acc_llamacpp=n/a ours/xllamacpp=n/a acc_xllamacpp=n/a",
}


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One `$FLEXHELM_CACHE` for this module: the machine's hardware profile (20-40 s to measure) and the tiny
    bench models are built by the first test that needs them and reused by the others, as on a user's machine."""
    return tmp_path_factory.mktemp("bench-cache")


# The quick runs CI keeps (the fast suite must finish well inside CI's 20 minutes on 2 cores): each code path of
# the benchmarks (all in RAM, disk offload, 4-bit, the kernels, W4's planner sweep through its W2 setup below).
# The others repeat those paths with more baselines and take 15-60 s each: `pytest -m slow` runs them.
SLOW = {"W1L", "W1c", "W2L", "W4", "W5", "W6", "quality"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(SUMMARY)])
def test_quick_runs_and_prints_summary(name, tmp_path, monkeypatch, capsys, bench_cache):
    monkeypatch.setenv("FLEXHELM_CACHE", str(bench_cache))
    summary = run(name, out_dir=tmp_path / "out", quick=True)
    assert re.fullmatch(SUMMARY[name], summary)
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == summary  # the summary is the last line
    if name in ("W2", "W2L"):  # each timed run against the roof measured just before it
        assert re.search(rf"^{name} run 0: roof .* ours at \d+\.\d\d of it$", out, re.M)
    assert (tmp_path / "out" / f"{name}.csv").is_file()
    if name not in ("quality", "W6", "kernels"):  # the shipped reference model, or no model at all
        tiny = "llama-tiny" if name.endswith("L") else "opt-tiny"  # a tiny model of the workload's family
        assert (bench_cache / "bench-models" / tiny / "config.json").is_file()


def test_unknown_workload_lists_known_names():
    with pytest.raises(ValueError, match=", ".join(sorted(WORKLOADS))):
        run("W9")
    assert set(WORKLOADS) == {"W1a", "W1b", "W1L", "W1c", "W2", "W2L", "W3", "W4", "W5", "W6", "quality", "kernels"}


def test_the_cli_names_every_workload_without_importing_the_benchmarks(capsys):
    import subprocess
    import sys

    from harness.cli import build_parser, main

    code = "import sys, harness.cli; sys.exit(any(m.startswith('harness.bench') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    listed = build_parser().format_help()  # `flexhelm -h`: the bench command's line lists the workloads
    assert all(name in listed for name in WORKLOADS), listed
    assert main(["bench", "W9"]) == 2 and "unknown benchmark 'W9'; known: " in capsys.readouterr().err
    assert main(["bench", "W4", "--setup", "W3"]) == 2 and "W4's setups are W1c, W2" in capsys.readouterr().err


def test_w4_measures_one_setup_alone(tmp_path, monkeypatch, capsys, bench_cache):
    """`flexhelm bench W4 --setup W2`: one half of W4 (each takes 40-50 minutes on 2 cores), its own CSV."""
    monkeypatch.setenv("FLEXHELM_CACHE", str(bench_cache))
    summary = run("W4", out_dir=tmp_path / "out", quick=True, setups=("W2",))
    assert re.fullmatch(r"W4-W2 auto/best=(\d+\.\d\d|n/a) median_abs_pred_err=\d+\.\d\d", summary)
    out = capsys.readouterr().out
    assert "W4 W2 setup" in out and "W4 W1c setup" not in out
    assert (tmp_path / "out" / "W4-W2.csv").is_file() and not (tmp_path / "out" / "W4.csv").exists()


def test_fit_fraction_fills_the_budget(tiny_opt, tmp_path):
    """The fraction W2 and W3 run at keeps at most the budget resident, and the next level would not fit."""
    from harness.bench.budget import fit_fraction
    from harness.planning.auto_policy import model_spec
    from runtime import Engine, Policy
    from runtime.policy import Placement
    from runtime.weights import weight_levels

    path, _ = tiny_opt("pre")
    levels = weight_levels(model_spec(path))

    def resident(f: float) -> int:
        engine = Engine(path, Policy(weights=Placement(f, 0)), offload_dir=tmp_path)
        engine.close()
        return engine.weights.nbytes

    tables = resident(0.0)  # the embedding tables, kept in memory whatever the placement
    assert fit_fraction(path, tables - 1) == 0.0
    for budget in (tables, tables + 50_000, tables + 100_000):
        f = fit_fraction(path, budget)
        assert resident(f) <= budget < resident(min(lv for lv in levels if lv > f)), budget
