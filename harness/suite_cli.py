"""`flexhelm run SUITE`, `flexhelm report DIR`, `flexhelm plot DIR`: the overnight workflow's commands.

Kept apart from `harness/cli.py`, which only calls `add_commands`; each command builds the spec objects
(suite, runner) and prints, the work is done in `suite`, `runner`, `report` and `plot`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

DEFAULT_RESULTS = "results"


def add_commands(sub) -> None:
    r = sub.add_parser("run", help="run every run of a suite file (resumable: rerun the same command)")
    r.add_argument("suite", help="suite YAML file, or the name of a shipped suite (quickstart)")
    r.add_argument("--results", default=DEFAULT_RESULTS, help="results folder; runs go to RESULTS/<suite>/<run>/")
    r.add_argument("--max-instances", type=int, help="cap every scenario's instances (a smoke test of a suite)")
    r.add_argument("--dry-run", action="store_true", help="validate the suite and list its runs, run nothing")
    r.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one run after another in this process; ray: each run a Ray task on a cluster's nodes")
    r.add_argument("--address", help="with --executor ray: `auto` or HOST:PORT joins that Ray cluster (default: "
                                      "start a local Ray instance)")
    r.add_argument("--max-retries", type=int, help="with --executor ray: times a run whose worker or node was lost "
                                                    "starts again (default: RayOptions.max_retries, 3)")
    r.add_argument("--cpus-per-run", type=int, help="with --executor ray: CPUs Ray reserves for each run, also its "
                                                     "torch threads (default: a node's, those of the smallest)")
    r.add_argument("--gpus-per-run", type=float, help="with --executor ray: GPUs Ray reserves for each run (default: "
                                                       "1 on a cluster with GPUs, else 0)")
    r.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="one table row per run (parquet + CSV) and fp16 vs compressed comparison")
    p.add_argument("suite_dir", help="a suite's results folder, e.g. results/quickstart")
    p.set_defaults(func=cmd_report)

    g = sub.add_parser("plot", help="throughput vs batch size, accuracy / perplexity per variant, time breakdown")
    g.add_argument("suite_dir", help="a suite's results folder, e.g. results/quickstart")
    g.set_defaults(func=cmd_plot)


def cmd_run(args: argparse.Namespace) -> int:
    from harness.suites.runner import SuiteRunner, helm_run_specs
    from harness.suites.suite import load_suite

    if args.max_instances is not None and args.max_instances < 1:
        print("flexhelm: error: --max-instances must be >= 1", file=sys.stderr)
        return 2
    ray_flags = {"address": args.address, "max_retries": args.max_retries, "cpus_per_run": args.cpus_per_run,
                 "gpus_per_run": args.gpus_per_run}
    ray_flags = {k: v for k, v in ray_flags.items() if v is not None}
    if args.executor != "ray" and ray_flags:
        given = ", ".join("--" + k.replace("_", "-") for k in ray_flags)
        print(f"flexhelm: error: {given} only apply with --executor ray", file=sys.stderr)
        return 2
    negative = min(ray_flags.get("max_retries", 0), ray_flags.get("gpus_per_run", 0)) < 0
    if negative or ray_flags.get("cpus_per_run", 1) < 1:
        print("flexhelm: error: --max-retries and --gpus-per-run must be >= 0, --cpus-per-run >= 1", file=sys.stderr)
        return 2
    if args.executor == "ray":
        from harness.suites.ray_runner import RayOptions, RayRunner, import_ray

        import_ray()  # a missing Ray is one line now, not after the suite has been read and checked
    suite = load_suite(args.suite, max_instances=args.max_instances)
    runner = SuiteRunner(args.results)
    if args.executor == "ray" and not args.dry_run:
        runner = RayRunner(args.results, RayOptions(**ray_flags))
    if args.dry_run:
        helm_run_specs(suite)  # the HELM side of validation: scenarios, arguments, models
        print(f"suite {suite.name}: {len(suite.runs)} runs -> {runner.suite_dir(suite)}/")
        for run in suite.runs:
            state = "finished" if runner.is_finished(run) else "to run"
            limit = run.scenario.max_instances or "all"
            print(f"  {run.id}  [{run.scenario.run}, instances {limit}, policy {_policy_text(run.variant)}] {state}")
        return 0
    print(f"suite {suite.name}: {len(suite.runs)} runs -> {runner.suite_dir(suite)}/", flush=True)
    again = f"flexhelm run {args.suite} --results {args.results}" + (
        f" --max-instances {args.max_instances}" if args.max_instances else "") + _executor_flags(args)
    try:
        with _sigterm_interrupts():
            outcomes = runner.run(suite)
    except KeyboardInterrupt:
        print(f"\nsuite {suite.name}: interrupted; finished runs and every finished batch of the run in progress "
              f"are kept. Resume with: {again}", file=sys.stderr)
        return 130
    count = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed", "busy")}
    busy = f", {count['busy']} left to another flexhelm run (run the command again when it ends: {again})" \
        if count["busy"] else ""
    print(f"suite {suite.name}: {count['done']} run now, {count['skipped']} finished before, "
          f"{count['failed']} failed{busy}")
    return 1 if count["failed"] or count["busy"] else 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's or `kill`'s stop) ends a suite as Ctrl-C does: the run in progress stops between
    batches' writes, its finished batches stay in its request cache, finished runs stay finished. A run whose
    requests are all done finishes its metrics and files first (seconds; a minute on the largest runs): a second
    SIGTERM or Ctrl-C meanwhile ends the process at once, as safe as `kill -9` (its files are whole or absent,
    `done.json` last; the rerun computes the metrics again from the request cache)."""
    signals = []

    def interrupt(signum, frame):
        if signals:
            print("\nstopped at once; nothing finished is lost (the rerun finishes the run being written)",
                  file=sys.stderr, flush=True)
            os._exit(130)
        signals.append(signum)
        print("\nstopping: a run being finished writes its files first (stop at once: Ctrl-C or SIGTERM again)",
              file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.reports.report import build_report, comparison, save_report, show

    suite_dir = Path(args.suite_dir)
    frame = build_report(suite_dir)
    paths = save_report(frame, suite_dir)
    print(show(frame, comparison(frame, suite_dir)))
    plots = sorted(suite_dir.glob("plots/*.png"))
    print("\nreport: " + ", ".join(str(p) for p in paths))
    if plots:
        print("plots:  " + ", ".join(str(p) for p in plots))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from harness.reports.plot import plot_suite
    from harness.reports.report import build_report, comparison

    suite_dir = Path(args.suite_dir)
    frame = build_report(suite_dir)
    paths = plot_suite(frame, suite_dir / "plots", comparison(frame, suite_dir))
    print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def _executor_flags(args: argparse.Namespace) -> str:
    """The executor's flags as given, for the command that resumes a suite."""
    if args.executor != "ray":
        return ""
    given = [(f, getattr(args, f.lstrip("-").replace("-", "_"))) for f in ("--address", "--max-retries",
                                                                          "--cpus-per-run", "--gpus-per-run")]
    return " --executor ray" + "".join(f" {flag} {value}" for flag, value in given if value is not None)


def _policy_text(variant) -> str:
    compress = "" if variant.compress.value == "off" else f", {variant.compress.value} {variant.bits}-bit"
    return ("auto" if variant.policy == "auto" else "explicit") + compress
