"""Benchmark outputs: the CSV of every timed run and a PNG of where each engine's time goes.

pandas and matplotlib are optional (the `bench` extra): the CSV falls back to the csv module, the plot
is skipped with a note. Both are imported only here and only when used.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from harness.bench.measure import Row, median_row


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """One line per row; the columns are the union of the rows' fields (subclasses of `Row` add some)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [r.to_dict() for r in rows]
    columns = list(dict.fromkeys(k for r in records for k in r))
    try:
        import pandas as pd
    except ImportError:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
    else:
        pd.DataFrame.from_records(records, columns=columns).to_csv(path, index=False)
    return path


def write_png(rows: Sequence[Row], path: Path, title: str) -> Path | None:
    """Stacked prefill + decode seconds per engine (medians), labelled with tok/s; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on these machines
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipped the plot {path} (pip install 'flexhelm[bench]')")
        return None
    engines = list(dict.fromkeys(r.engine for r in rows))  # first-seen order
    meds = [median_row([r for r in rows if r.engine == e]) for e in engines]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(engines, [m.prefill_s for m in meds], label="prefill")
    ax.bar(engines, [m.decode_s for m in meds], bottom=[m.prefill_s for m in meds], label="decode")
    for i, m in enumerate(meds):
        ax.annotate(f"{m.throughput:.1f} tok/s", (i, m.busy_s), ha="center", va="bottom")
    ax.margins(y=0.12)  # headroom for the labels above the tallest bar
    ax.set_ylabel("seconds (median over repetitions)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
