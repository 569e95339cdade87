"""`flexhelm plot`: a suite's report as figures, each saved as PNG and SVG in `<suite>/plots/`.

- `throughput_vs_batch`: generated tokens/s against batch size, one line per model x variant, one panel per
  scenario that generates (scoring-only scenarios, e.g. WikiText, plot prompt tokens/s instead);
- `quality_per_variant`: each scenario's main metric (accuracy, perplexity, ...) per variant and model, with 95%
  intervals over instances; accuracies from 0 to 1, perplexities on a log axis;
- `quality_difference`: each compressed variant minus its baseline with the 95% paired bootstrap interval,
  against a zero line;
- `time_breakdown`: per run, seconds of prefill, decode and the rest of the engine calls (tokenizing,
  rendering, batching), and the harness's own time (adapt, metrics, writes) when the run recorded it.
"""

from __future__ import annotations

from pathlib import Path

from harness.reports.report import QUALITY
from harness.suites import atomic

FORMATS = ("png", "svg")


def plot_suite(frame, out_dir: str | Path, compared=None) -> list[Path]:
    """Draw every figure `frame` (from `report.build_report`) and `compared` (`report.comparison` with the runs'
    folder) have data for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for name, draw in (("throughput_vs_batch", _throughput), ("quality_per_variant", _quality),
                       ("quality_difference", _difference), ("time_breakdown", _breakdown)):
        figure = draw(frame, compared)
        if figure is not None:
            paths += _save(figure, out_dir / name)
    return paths


def _panels(count: int, width: float = 5.0, height: float = 3.6):
    import matplotlib.pyplot as plt

    cols = min(count, 3)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _throughput(frame, compared=None):
    from matplotlib.ticker import ScalarFormatter

    scenarios = sorted(frame["scenario"].unique())
    fig, axes = _panels(len(scenarios))
    for ax, scenario in zip(axes, scenarios):
        rows = frame[frame["scenario"] == scenario]
        generates = (rows["throughput_tok_s"].fillna(0) > 0).any()
        column, label = ("throughput_tok_s", "generated tokens/s") if generates else ("prompt_tok_s", "prompt tokens/s")
        for (model, variant), line in rows.groupby(["model", "variant"], sort=True):
            line = line.sort_values("batch_size")
            ax.plot(line["batch_size"], line[column], marker="o", label=f"{model} {variant}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(rows["batch_size"].unique()))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.minorticks_off()
        ax.set_xlabel("batch size (requests per engine call)")
        ax.set_ylabel(label)
        ax.set_title(scenario)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Throughput against batch size")
    fig.tight_layout()
    return fig


def _quality(frame, compared=None):
    """Each scenario's main metric per variant and model, with 95% intervals (1.96 standard errors over the
    instances). Accuracies on an axis from 0 to 1, perplexities on a log axis: no truncated axis that turns a
    0.3-point difference into a tower."""
    panels = [(s, rows["main_metric"].iloc[0]) for s, rows in frame.groupby("scenario", sort=True)
              if rows["main_metric"].iloc[0] in QUALITY]
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    for ax, (scenario, metric) in zip(axes, panels):
        rows = frame[frame["scenario"] == scenario]
        # a metric does not depend on the batch size: one point per (model, variant), the first batch's
        points = rows.sort_values("batch_size").groupby(["model", "variant"], sort=True).first()
        models = sorted(points.index.get_level_values("model").unique())
        for i, model in enumerate(models):
            mine = points.loc[model]
            x = [j + (i - (len(models) - 1) / 2) * 0.15 for j in range(len(mine))]
            ax.errorbar(x, mine[metric], yerr=1.96 * mine["main_se"].fillna(0), fmt="o", capsize=4, label=model)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels(list(mine.index))
        higher = "higher is better" if QUALITY[metric] else "lower is better"
        ax.set_ylabel(f"{metric} ({higher})")
        if "perplexity" in metric:
            ax.set_yscale("log")
        elif QUALITY[metric]:
            ax.set_ylim(0, 1)
        ax.set_title(scenario)
        ax.grid(True, axis="y", alpha=0.3)
        if len(models) > 1:
            ax.legend(fontsize="small")
    fig.suptitle("Quality per variant (95% intervals over instances)")
    fig.tight_layout()
    return fig


def _difference(frame, compared=None):
    """Compressed minus baseline per scenario with its 95% paired interval, against a zero line: one look tells
    whether compression lost quality (an interval away from 0) or not."""
    if compared is None or compared.empty or compared["delta_low"].isna().all():
        return None
    rows = compared.dropna(subset=["delta_low"]).drop_duplicates(["model", "scenario", "variant", "metric"])
    fig, axes = _panels(len(rows), width=4.2, height=2.2)
    for ax, (_, r) in zip(axes, rows.iterrows()):
        ax.axvline(0, color="black", linewidth=1)
        ax.errorbar([r["delta"]], [0], xerr=[[r["delta"] - r["delta_low"]], [r["delta_high"] - r["delta"]]],
                    fmt="o", capsize=5, color="tab:red" if not r["delta_low"] <= 0 <= r["delta_high"] else "tab:blue")
        reach = max(abs(r["delta_low"]), abs(r["delta_high"])) * 1.3 or 1.0
        ax.set_xlim(-reach, reach)
        ax.set_yticks([])
        better = "higher" if QUALITY.get(r["metric"], True) else "lower"
        ax.set_xlabel(f"{r['variant']} - {r['baseline']}: {r['metric']} ({better} is better)")
        ax.set_title(f"{r['model']} {r['scenario']} (n={int(r['n'])})", fontsize="medium")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Difference from the baseline, 95% paired bootstrap interval (red: excludes 0)")
    fig.tight_layout()
    return fig


def _breakdown(frame, compared=None):
    import matplotlib.pyplot as plt

    parts = {"prefill": frame["prefill_s"].fillna(0), "decode": frame["decode_s"].fillna(0),
             "other engine": (frame["engine_wall_s"] - frame["prefill_s"] - frame["decode_s"]).clip(lower=0).fillna(0)}
    if "harness_s" in frame:
        parts["harness"] = frame["harness_s"].fillna(0)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(frame) + 1.5))
    left = None
    for label, seconds in parts.items():
        ax.barh(frame["run"], seconds, left=left, label=label)
        left = seconds if left is None else left + seconds
    ax.set_xlabel("time (s)")
    ax.set_ylabel("run")
    ax.invert_yaxis()
    ax.legend(fontsize="small")
    ax.set_title("Time per run")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _save(figure, stem: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = [atomic.write_with(stem.with_suffix(f".{fmt}"), lambda tmp, fmt=fmt: figure.savefig(tmp, format=fmt,
                                                                                                   dpi=120))
             for fmt in FORMATS]
    plt.close(figure)
    return paths
