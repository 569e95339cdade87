"""Reports and plots of a small suite run on the fake runtime: parquet round trip, comparison, figure files."""

from __future__ import annotations

import pytest

pytest.importorskip("helm")
pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from harness.suites.executor import LocalExecutor  # noqa: E402
from harness.suites.runner import SuiteRunner  # noqa: E402
from harness.suites.suite import load_suite  # noqa: E402
from tests.harness.fake_runtime import FakeRuntime, suite_text  # noqa: E402

SCENARIOS_VARIANTS = """\
scenarios:
  - run: wikitext
    max_instances: 2
  - run: synthetic:num_prompts=4,prompt_len=8,output_len=2
    name: synthetic
    batch_sizes: [1, 2, 4]
variants:
  - name: fp16
    batch_sizes: [4]
  - name: 4bit
    compress: both
    batch_sizes: [4]
  - name: 8bit                    # sorts before fp16: the baseline is the exact run, not the first uncompressed
    compute: int8
    batch_sizes: [4]
"""


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory, tiny_opt):
    mp = pytest.MonkeyPatch()
    mp.setenv("NLTK_DATA", str(tmp_path_factory.getbasetemp() / "nltk"))
    folder, _ = tiny_opt()
    tmp = tmp_path_factory.mktemp("report")
    path = tmp / "suite.yaml"
    path.write_text(suite_text("small", folder, SCENARIOS_VARIANTS))
    SuiteRunner(tmp / "results", LocalExecutor(FakeRuntime()), progress=False).run(load_suite(path))
    yield tmp / "results" / "small"
    mp.undo()


def test_report_rows_and_parquet_round_trip(suite_dir):
    from harness.reports.report import build_report, load_report, save_report

    frame = build_report(suite_dir)
    assert len(frame) == 12 and frame["run"].is_unique
    assert set(frame[frame["variant"] == "8bit"]["compute"]) == {"int8"} and set(frame["bits"]) == {4, 8, 16}
    assert {"model", "scenario", "variant", "policy", "batch_size", "throughput_tok_s", "prefill_s", "decode_s",
            "peak_host_gib", "perplexity", "word_perplexity"} <= set(frame.columns)
    synthetic = frame[frame["scenario"] == "synthetic"]
    assert sorted(synthetic["batch_size"]) == [1, 1, 1, 2, 2, 2, 4, 4, 4] and (synthetic["throughput_tok_s"] > 0).all()
    parquet, csv = save_report(frame, suite_dir)
    pd.testing.assert_frame_equal(load_report(parquet), frame)
    assert len(pd.read_csv(csv)) == 12


def test_comparison_pairs_fp16_with_each_compressed_variant(suite_dir):
    from harness.reports.report import build_report, comparison, show

    frame = build_report(suite_dir)
    table = comparison(frame, suite_dir)
    assert len(table) == 8  # 4-bit and int8 compute, each at wikitext b4, synthetic b1/b2/b4
    assert set(table["baseline"]) == {"fp16"} and sorted(set(table["variant"])) == ["4bit", "8bit"]
    wiki = table[table["scenario"] == "wikitext"].iloc[0]
    assert (wiki["baseline"], wiki["variant"], wiki["metric"]) == ("fp16", "4bit", "word_perplexity")
    assert wiki["delta"] == pytest.approx(0.0) and wiki["speedup"] == pytest.approx(1.0)  # the fake is exact
    assert wiki["n"] == 2 and wiki["delta_low"] == wiki["delta_high"] == pytest.approx(0.0)  # paired: no noise
    assert (table[table["scenario"] == "synthetic"]["metric"] == "-").all()  # throughput runs: no quality metric
    text = show(frame, table)
    assert "fp16 against compressed" in text and "word_perplexity" in text


def test_plot_files(suite_dir):
    from harness.reports.plot import plot_suite
    from harness.reports.report import build_report, comparison

    frame = build_report(suite_dir)
    paths = plot_suite(frame, suite_dir / "plots", comparison(frame, suite_dir))
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{n}.{ext}" for n in ("throughput_vs_batch", "quality_per_variant", "quality_difference",
                                                  "time_breakdown") for ext in ("png", "svg"))
    for p in paths:
        assert p.stat().st_size > 1000
    assert b"generated tokens/s" in (suite_dir / "plots" / "throughput_vs_batch.svg").read_bytes()


def test_cli_report_prints_table_and_paths(suite_dir, capsys):
    from harness.cli import main

    assert main(["plot", str(suite_dir)]) == 0
    assert main(["report", str(suite_dir)]) == 0
    out = capsys.readouterr().out
    assert "fp16 against compressed" in out and "report.parquet" in out and "throughput_vs_batch.png" in out


def test_report_of_an_empty_folder_says_so(tmp_path):
    from harness.reports.report import ReportError, build_report

    with pytest.raises(ReportError, match="no finished runs"):
        build_report(tmp_path)
