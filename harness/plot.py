"""`flexhelm plot`: a suite's report as figures, each saved as PNG and SVG in `<suite>/plots/`.

- `throughput_vs_batch`: generated tokens/s against batch size, one line per model x variant, one panel per
  scenario that generates (scoring-only scenarios, e.g. WikiText, plot prompt tokens/s instead);
- `quality_per_variant`: each scenario's main metric (accuracy, perplexity, ...) per variant, bars per model;
- `time_breakdown`: per run, seconds of prefill, decode and the rest of the engine calls (tokenizing,
  rendering, batching), and the harness's own time (adapt, metrics, writes) when the run recorded it.
"""

from __future__ import annotations

from pathlib import Path

from harness import atomic
from harness.report import QUALITY

FORMATS = ("png", "svg")


def plot_suite(frame, out_dir: str | Path) -> list[Path]:
    """Draw every figure `frame` (from `report.build_report`) has data for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for name, draw in (("throughput_vs_batch", _throughput), ("quality_per_variant", _quality),
                       ("time_breakdown", _breakdown)):
        figure = draw(frame)
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


def _throughput(frame):
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


def _quality(frame):
    panels = [(s, next(m for m in QUALITY if m in rows and rows[m].notna().any()))
              for s, rows in frame.groupby("scenario", sort=True)
              if any(m in rows and rows[m].notna().any() for m in QUALITY)]
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    for ax, (scenario, metric) in zip(axes, panels):
        rows = frame[frame["scenario"] == scenario]
        # a metric does not depend on the batch size: one bar per (model, variant), averaged over batches
        table = rows.groupby(["variant", "model"], sort=True)[metric].mean().unstack("model")
        table.plot.bar(ax=ax, rot=0)
        higher = "higher is better" if QUALITY[metric] else "lower is better"
        ax.set_xlabel("variant")
        ax.set_ylabel(f"{metric} ({higher})")
        if "perplexity" in metric:
            ax.set_yscale("log")
        ax.set_title(scenario)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Quality per variant")
    fig.tight_layout()
    return fig


def _breakdown(frame):
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
