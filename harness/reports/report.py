"""`flexhelm report`: a suite's finished runs as one pandas DataFrame, and fp16 against each compressed variant.

One row per run: what ran (model, scenario, variant, compression, policy, batch), its main quality metric and
that metric's bootstrap standard error over instances, every HELM stat of the run (its mean over the evaluation
split, unperturbed), and the runtime's totals (throughput, prefill and decode seconds, tokens, peak memory per
tier in GiB). Saved as `report.parquet` and `report.csv` next to the runs. The comparison pairs each
compressed variant with the uncompressed one of the same model, scenario and batch size: the main metric of
both with standard errors, the difference with its 95% paired bootstrap interval (`harness.reports.paired`), and the
speed-up.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.reports import paired
from harness.suites import atomic
from runtime.errors import FlexhelmError

GiB = 2**30
EVAL_SPLITS = ("test", "valid")
QUALITY = {
    # metric: higher is better; the first one a run has is its scenario's main metric (accuracies first: a
    # generation run also reports the perplexity of what it generated)
    "lambada_accuracy": True, "exact_match": True, "quasi_exact_match": True, "rouge_2": True, "f1_score": True,
    "target_perplexity": False, "word_perplexity": False, "perplexity": False, "bits_per_byte": False,
}
RUN_COLUMNS = ("run", "model", "scenario", "scenario_run", "variant", "compress", "bits", "group_size", "compute",
               "policy", "policy_source", "batch_size", "main_metric", "main_se")
RUNTIME_COLUMNS = ("throughput_tok_s", "prompt_tok_s", "prefill_s", "decode_s", "engine_wall_s", "harness_s",
                   "prompt_tokens", "generated_tokens", "engine_calls", "requests", "instances")


class ReportError(FlexhelmError, ValueError):
    """The folder holds no finished runs, or one of them is unreadable."""


def build_report(suite_dir: str | Path):
    """One row per finished run under `suite_dir` (runs without `done.json` are left out)."""
    import pandas as pd

    suite_dir = Path(suite_dir)
    rows = [_row(d) for d in sorted(suite_dir.iterdir()) if (d / "done.json").is_file()] if suite_dir.is_dir() else []
    if not rows:
        raise ReportError(f"{suite_dir}: no finished runs (a run is finished when its done.json exists)")
    frame = pd.DataFrame(rows)
    first = [c for c in (*RUN_COLUMNS, *RUNTIME_COLUMNS) if c in frame.columns]
    peaks = sorted(c for c in frame.columns if c.startswith("peak_"))
    metrics = sorted(c for c in frame.columns if c not in first and c not in peaks)
    return frame[first + peaks + metrics].reset_index(drop=True)


def _row(run_dir: Path) -> dict:
    spec = _json(run_dir / "flexhelm_run.json")
    policy = _json(run_dir / "policy.json")
    runtime = _json(run_dir / "runtime.json")
    variant = spec["variant"]
    compute = variant.get("compute", "exact")  # runs from before `compute` computed exactly
    row = {"run": spec["id"], "model": spec["model"]["name"], "scenario": spec["scenario"]["name"],
           "scenario_run": spec["scenario"]["run"], "variant": variant["name"], "compress": variant["compress"],
           "bits": variant["bits"] if variant["compress"] != "off" else 8 if compute == "int8" else 16,
           "group_size": variant["group_size"] if variant["compress"] != "off" else 0, "compute": compute,
           "policy": _policy_text(policy["policy"]), "policy_source": policy["source"],
           "batch_size": spec["batch_size"]}
    done = _json(run_dir / "done.json")
    for key in RUNTIME_COLUMNS:
        value = done.get(key) if key == "harness_s" else runtime.get("wall_s" if key == "engine_wall_s" else key)
        row[key] = float("nan") if value is None else value
    for tier, value in runtime.get("peak_memory", {}).items():
        row[f"peak_{tier}_gib"] = value / GiB
    for name, value in _stat_means(_json(run_dir / "stats.json")).items():
        row[name if name not in row else f"helm_{name}"] = value
    # a value, not NaN; throughput workloads (synthetic prompts of random words) have no quality metric
    metric = None if row["scenario_run"].startswith("synthetic") else next(
        (m for m in QUALITY if m in row and row[m] == row[m]), None)
    row["main_metric"] = metric or "-"
    row["main_se"] = paired.standard_error(run_dir, metric) if metric in paired.FORMS else float("nan")
    return row


def _stat_means(stats: list[dict]) -> dict[str, float]:
    """Mean of each stat over the first evaluation split present, unperturbed runs only."""
    means: dict[str, dict[str, float]] = {}
    for s in stats:
        name = s["name"]
        if name.get("perturbation") is None and name.get("split") in EVAL_SPLITS and s.get("mean") is not None:
            means.setdefault(name["name"], {})[name["split"]] = float(s["mean"])
    return {k: next(v[split] for split in EVAL_SPLITS if split in v) for k, v in means.items()}


def _policy_text(policy: dict) -> str:
    """Short description: batch shape and where weights / cache live (percent on device, host; rest disk)."""
    def place(p: dict) -> str:
        return f"{round(100 * p['device'])}/{round(100 * p['host'])}"

    return (f"{policy['gpu_batch_size']}x{policy['num_gpu_batches']} w{place(policy['weights'])} "
            f"c{place(policy['cache'])}")


COMPARISON_COLUMNS = ("model", "scenario", "batch_size", "baseline", "variant", "metric", "n", "baseline_value",
                      "baseline_se", "value", "se", "delta", "delta_low", "delta_high", "speedup")


def comparison(frame, suite_dir: str | Path | None = None):
    """For each compressed run (4-bit weights or cache, or int8 compute), the uncompressed run computed exactly of the
    same model, scenario and batch size beside it. With
    the runs' folder, each value's standard error and the difference's 95% paired bootstrap interval over the
    instances both runs scored (`harness.reports.paired`); without, those columns are NaN."""
    import pandas as pd

    nan = float("nan")
    rows = []
    for (model, scenario, batch), group in frame.groupby(["model", "scenario", "batch_size"], sort=True):
        exact = (group["compress"] == "off") & (group["compute"] == "exact" if "compute" in group else True)
        if not exact.any():
            continue
        base = group[exact].iloc[0]
        metric = base["main_metric"] if base["main_metric"] in QUALITY else None
        for _, run in group[~exact].iterrows():
            b, v = (base[metric], run[metric]) if metric else (nan, nan)
            row = {"model": model, "scenario": scenario, "batch_size": batch, "baseline": base["variant"],
                   "variant": run["variant"], "metric": metric or "-", "n": 0, "baseline_value": b,
                   "baseline_se": nan, "value": v, "se": nan, "delta": v - b, "delta_low": nan, "delta_high": nan,
                   "speedup": _speed(run) / _speed(base) if _speed(base) else nan}
            pair = (paired.compare(Path(suite_dir) / base["run"], Path(suite_dir) / run["run"], metric)
                    if suite_dir is not None and metric in paired.FORMS else None)
            if pair is not None:
                row.update(n=pair.n, baseline_se=pair.baseline_se, se=pair.se, delta_low=pair.delta_low,
                           delta_high=pair.delta_high)
            rows.append(row)
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def _speed(run) -> float:
    """Generated tokens per engine second; prompt tokens per second for runs that only score (perplexity)."""
    generated = run.get("throughput_tok_s")
    if generated == generated and generated:  # not NaN, not 0
        return float(generated)
    prompt = run.get("prompt_tok_s")
    return float(prompt) if prompt == prompt and prompt else 0.0


def save_report(frame, suite_dir: str | Path) -> list[Path]:
    """`report.parquet` and `report.csv` in `suite_dir`, each written atomically."""
    suite_dir = Path(suite_dir)
    return [atomic.write_with(suite_dir / "report.parquet", lambda tmp: frame.to_parquet(tmp, index=False)),
            atomic.write_with(suite_dir / "report.csv", lambda tmp: frame.to_csv(tmp, index=False))]


def load_report(path: str | Path):
    import pandas as pd

    return pd.read_parquet(path)


def show(frame, compared) -> str:
    """The runs and the comparison as aligned text tables."""
    runs = frame[[c for c in ("model", "scenario", "variant", "batch_size") if c in frame]].copy()
    runs["metric"] = frame["main_metric"]
    runs["value"] = [row[m] if m in QUALITY else float("nan") for m, (_, row) in zip(frame["main_metric"],
                                                                                     frame.iterrows())]
    runs["± SE"] = frame["main_se"]
    for column, title in (("throughput_tok_s", "gen tok/s"), ("prompt_tok_s", "prompt tok/s"),
                          ("prefill_s", "prefill s"), ("decode_s", "decode s"), ("peak_host_gib", "peak host GiB")):
        if column in frame:
            runs[title] = frame[column]
    fmt = lambda x: f"{x:.4g}"
    parts = ["runs:", runs.rename(columns={"batch_size": "batch"}).to_string(index=False, float_format=fmt)]
    if compared.empty:
        parts.append("\nno fp16 / compressed pairs to compare")
    else:
        table = compared[["model", "scenario", "batch_size", "variant", "metric", "n", "speedup"]].copy()
        # NaN: no quality metric (throughput runs), or no per-instance stats for an interval
        pm = lambda v, se: "-" if v != v else f"{v:.4g}" if se != se else f"{v:.4g} ± {se:.2g}"
        table["baseline (± SE)"] = [pm(v, se) for v, se in zip(compared["baseline_value"], compared["baseline_se"])]
        table["compressed (± SE)"] = [pm(v, se) for v, se in zip(compared["value"], compared["se"])]
        table["difference [95% paired CI]"] = [
            "-" if d != d else f"{d:+.4g}" + ("" if lo != lo else f" [{lo:+.3g}, {hi:+.3g}]" + _verdict(lo, hi))
            for d, lo, hi in zip(compared["delta"], compared["delta_low"], compared["delta_high"])]
        parts += ["\nfp16 against compressed (same model, scenario, batch; the difference is compressed - fp16, its "
                  "interval a paired bootstrap over the instances both scored):",
                  table.rename(columns={"batch_size": "batch"}).to_string(index=False, float_format=fmt)]
    return "\n".join(parts)


def _verdict(low: float, high: float) -> str:
    return "" if low <= 0 <= high else " *"  # the interval excludes 0: a difference, not noise


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: unreadable ({e})") from None
