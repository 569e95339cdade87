"""`flexhelm run`: every run of a suite, resumable, into `<results>/<suite>/<run id>/` in HELM's layout.

A run is HELM's method with flexhelm's executor in the middle (see `SuiteRunner.run_one`). What makes it
resumable after kill -9 at any moment:
- a run is finished when its `done.json` exists (written last) and names the run's current key; finished
  runs are skipped, and a run whose suite entry changed is redone;
- inside a run, every finished batch is in the run's request cache (`requests.jsonl`, fsync'ed per batch);
  a rerun adapts again (cheap, deterministic) and sends only the requests the cache cannot answer;
- every output file is written whole or not at all (`harness.suites.atomic`).

A run's metrics and files are computed in a background thread while the next run's requests run in the
runtime (whose torch kernels release the GIL): on the quickstart that hides most of the harness's time
(benchmark W5). A crash waits for those writes; a run is finished only when its `done.json` is written.

Besides HELM's files (run_spec.json, scenario.json, scenario_state.json, stats.json, per_instance_stats.json,
readable by helm-summarize) a run folder holds `policy.json` (the policy used and how it was chosen),
`env.json` (versions, git commit, machine), `runtime.json` (engine time, tokens, peak memory per tier),
`flexhelm_run.json` (the suite's RunSpec) and `run.log` (HELM's log of the run).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from harness.helm import json_io
from harness.planning.policies import run_policy
from harness.suites import atomic, memory_watch, run_lock
from harness.suites.executor import ExecutionJob, Executor, LocalExecutor
from harness.suites.progress import SuiteProgress
from harness.suites.request_cache import RequestCache, model_identity
from harness.suites.run_log import RunLog
from harness.suites.suite import PROJECT_ROOT, RunSpec, Suite, SuiteError

DONE = "done.json"
HELM_DIR = "_helm"
"""Per suite: HELM's scenario downloads, tokenizer context and eval cache (`<results>/<suite>/_helm`)."""


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: str
    """`done` (computed now), `skipped` (finished before), `failed`, or `busy` (another runner holds it; `error`
    names the holder)."""
    wall_s: float = 0.0
    runtime_s: float = 0.0
    """Of `wall_s`, seconds inside the runtime (model load + engine calls)."""
    error: str | None = None


def helm_run_specs(suite: Suite) -> dict[tuple[str, str], object]:
    """HELM RunSpec of every (model, scenario) of `suite`, checked before any work: an unknown scenario or
    argument, or a model HELM cannot register, is a `SuiteError` naming the suite file's line."""
    from harness.helm import plugin  # importing registers flexhelm's scenarios and prepares the offline env
    from scenarios.errors import ScenarioArgumentError
    from scenarios.run_specs import build_run_specs

    specs, errors = {}, []
    for model in suite.models:
        try:
            deployment = plugin.register_model(model.name, model.path)
        except plugin.PluginError as e:
            raise SuiteError(f"{suite.source}: model {model.name!r}: {e}") from None
        for entry in suite.scenarios:
            try:
                built = build_run_specs(f"{entry.run}{',' if ':' in entry.run else ':'}model={deployment}")
            except (ScenarioArgumentError, ValueError) as e:
                errors.append(f"{suite.source}:{entry.line}: scenarios: {entry.run!r}: {e}")
                continue
            if len(built) != 1:
                errors.append(f"{suite.source}:{entry.line}: scenarios: {entry.run!r} expands to {len(built)} "
                              "HELM runs; list each as its own entry")
                continue
            spec = built[0]
            if entry.max_instances is not None:
                spec = replace(spec, adapter_spec=replace(spec.adapter_spec, max_eval_instances=entry.max_instances))
            specs[(model.name, entry.name)] = spec
    if errors:
        raise SuiteError("\n".join(dict.fromkeys(errors)))
    return specs


class SuiteRunner:
    def __init__(self, results_dir: str | os.PathLike = "results", executor: Executor | None = None,
                 progress: bool | None = None, ram_limit: int | None = None) -> None:
        self.results_dir = Path(results_dir)
        self.executor = executor or LocalExecutor()
        self.progress_enabled = progress
        self.ram_limit = ram_limit
        """Bytes of RAM an `auto` plan may fill besides the variant's limits (a Ray task's reservation)."""
        self._last_adapted: tuple = (None, None)
        self._prefetched: dict[str, Future] = {}

    def suite_dir(self, suite: Suite) -> Path:
        return self.results_dir / suite.name

    def run(self, suite: Suite) -> list[RunOutcome]:
        """Run every run of `suite` not finished yet; a failed run is logged and the others go on."""
        helm_specs = helm_run_specs(suite)
        from harness.suites import env_info

        self._services = _HelmServices(self.suite_dir(suite) / HELM_DIR)
        self._env = env_info.collect(PROJECT_ROOT)
        _import_helm_classes(helm_specs.values())
        progress = SuiteProgress(len(suite.runs), self.progress_enabled)
        pending: list[Future] = []
        self._reported = 0  # runs of `pending` whose summary line is out
        try:
            # one finisher: runs finish in order, each while the next one computes; it also adapts the next
            # scenario ahead of time (HELM's tokenization)
            with RunLog.quiet(), ThreadPoolExecutor(1, thread_name_prefix="flexhelm-finish") as finisher:
                for i, run in enumerate(suite.runs):
                    for ahead in suite.runs[i:i + 2] if i == 0 else suite.runs[i + 1:i + 2]:
                        if not self.is_finished(ahead):  # the first while the first run plans, then the next
                            self._prefetch(helm_specs[(ahead.model.name, ahead.scenario.name)], ahead.id, finisher)
                    try:
                        pending.append(self._guarded(run, helm_specs[(run.model.name, run.scenario.name)],
                                                     progress, finisher))
                    except BaseException:  # Ctrl-C or SIGTERM: let finished runs finish, adapt nothing new
                        for ahead in self._prefetched.values():
                            ahead.cancel()
                        raise
                    self._report(pending, progress, wait=False)
                self._report(pending, progress, wait=True)
        finally:
            progress.close()
            self.executor.release()  # the last run's model: a suite leaves nothing loaded behind
        return [f.result() for f in pending]

    def _report(self, pending: list[Future], progress: SuiteProgress, wait: bool) -> None:
        """Summary lines of the runs finished since the last call, in suite order (main thread only)."""
        for f in pending[self._reported:]:
            if not (wait or f.done()):
                return
            progress.end_run(summary_line(f.result()))
            self._reported += 1

    def run_dir(self, run: RunSpec) -> Path:
        return self.results_dir / run.suite / run.id

    def is_finished(self, run: RunSpec) -> bool:
        done = self.run_dir(run) / DONE
        return done.is_file() and atomic.read_json(done).get("key") == run.key

    def claim(self, run: RunSpec) -> tuple[RunOutcome | None, run_lock.RunLock | None]:
        """(None, the run folder's lock) for a run to compute now; (its outcome, None) for one finished before or held
        by another runner. The lock is held until the run is finished or failed (harness/suites/run_lock.py)."""
        if self.is_finished(run):
            return RunOutcome(run.id, "skipped"), None
        run_dir = self.run_dir(run)
        lock = run_lock.try_lock(run_dir)
        if lock is None:
            return RunOutcome(run.id, "busy", error=run_lock.holder(run_dir)), None
        if self.is_finished(run):  # its holder finished it while we were getting here
            lock.release()
            return RunOutcome(run.id, "skipped"), None
        (run_dir / DONE).unlink(missing_ok=True)  # a stale marker from an edited entry must not survive a crash
        return None, lock

    def _guarded(self, run: RunSpec, helm_spec, progress: SuiteProgress, finisher: ThreadPoolExecutor) -> Future:
        """The run's outcome: its requests computed now, its metrics and files on `finisher`."""
        outcome, lock = self.claim(run)
        if outcome is not None:
            return _resolved(outcome)
        run_dir = self.run_dir(run)
        log = RunLog(run_dir / "run.log", run.id)
        started = time.perf_counter()

        def end() -> None:
            log.close()
            lock.release()

        def guarded(step: Callable[[], object], last: bool) -> object:
            RunLog.current.run = run.id
            try:
                return step()
            except Exception as e:  # one broken run must not cost the night: log it, go on with the next
                logging.getLogger("helm").error(traceback.format_exc())
                return RunOutcome(run.id, "failed", time.perf_counter() - started, error=f"{type(e).__name__}: {e}")
            finally:
                if last:
                    end()

        finish = None
        try:
            finish = guarded(lambda: self.run_one(run, helm_spec, progress), last=False)
        finally:  # failed, or interrupted (Ctrl-C, SIGTERM; the batches done are in the request cache): ends here
            if isinstance(finish, RunOutcome) or finish is None:
                end()
        if isinstance(finish, RunOutcome):
            return _resolved(finish)
        done = lambda: RunOutcome(run.id, "done", time.perf_counter() - started, finish())  # noqa: E731
        return finisher.submit(guarded, done, True)

    def run_one(self, run: RunSpec, helm_spec, progress: SuiteProgress) -> Callable[[], float]:
        """Compute the requests of `run` (HELM RunSpec `helm_spec`); returns what finishes it: metrics, the
        run folder's files, then `done.json`; that returns the seconds the run spent in the runtime."""
        started = time.perf_counter()
        run_dir = self.run_dir(run)
        # Load the scenario's instances and adapt them into requests (HELM's adapter)
        scenario, states = self._adapt(helm_spec)
        eval_instances = len({s.instance.id for s in states})

        # Choose the policy for these requests (a rerun keeps the first attempt's plan)
        resolved = run_policy(run, run_dir, [s.request for s in states], self.ram_limit)

        # Execute in batches on the runtime (batches finished before a crash come from the request cache)
        job = ExecutionJob(run.model.path, resolved.policy, model_identity(run.model.path))
        cache = RequestCache(run_dir / "requests.jsonl")
        progress.start_run(run.id, len(states), eval_instances)
        with memory_watch.MemoryWatch(run_dir):
            states, report = self.executor.execute(job, states, cache, progress.batch_done)
        progress.executed()
        return lambda: self._finish(run, helm_spec, scenario, states, resolved, report, cache, started)

    def _finish(self, run: RunSpec, helm_spec, scenario, states, resolved, report, cache, started) -> float:
        from helm.benchmark.adaptation.scenario_state import ScenarioState
        from helm.benchmark.metrics.metric import create_metric
        from helm.benchmark.runner import remove_per_instance_stats_nans, remove_stats_nans

        run_dir, services, adapter_spec = self.run_dir(run), self._services, helm_spec.adapter_spec
        eval_instances = len({s.instance.id for s in states})
        scenario_state = ScenarioState(adapter_spec=adapter_spec, request_states=states,
                                       annotator_specs=helm_spec.annotators)
        if helm_spec.annotators:
            scenario_state = services.annotator_executor.execute(scenario_state)

        # Apply the metrics
        stats, per_instance = [], []
        for metric_spec in helm_spec.metric_specs:
            result = create_metric(metric_spec).evaluate(scenario_state, services.metric_service,
                                                         str(services.base / "eval_cache"), 1)
            stats.extend(result.aggregated_stats)
            per_instance.extend(result.per_instance_stats)

        # Write: HELM's files, ours, and last the marker that makes the run finished
        helm_outputs = {  # the two large ones compact: json's C encoder, a third of the size
            "run_spec.json": (helm_spec, False),
            "scenario.json": (scenario, False),
            "scenario_state.json": (scenario_state, True),
            "stats.json": (remove_stats_nans(stats), False),
            "per_instance_stats.json": (remove_per_instance_stats_nans(per_instance), True),
        }
        for name, (value, compact) in helm_outputs.items():
            atomic.write_text(run_dir / name, json_io.dumps(json_io.to_tree(value), compact))
        ours = {
            "flexhelm_run.json": {**run.to_json(), "key": run.key},
            "policy.json": {**resolved.to_json(), "run_key": run.key},
            "env.json": self._env,
            "runtime.json": runtime_summary(cache.calls_for(set(report.keys)), len(states), eval_instances),
        }
        for name, data in ours.items():
            atomic.write_json(run_dir / name, data)
        runtime_s = resolved.plan_s + report.load_s + report.engine_s
        logging.getLogger("flexhelm").info(f"{len(states)} requests, {runtime_s:.2f} s in the runtime")
        # harness_s: this invocation's time outside the runtime (adapt, metrics, writes; a resumed run's share)
        atomic.write_json(run_dir / DONE, {"key": run.key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                           "harness_s": time.perf_counter() - started - runtime_s})
        return runtime_s

    def _adapt(self, helm_spec) -> tuple:
        """(scenario, request states) of `helm_spec`. Adapting is deterministic and the same for every variant
        and batch size of a model x scenario, which the suite runs one after another: the last one is reused."""
        key = _spec_key(helm_spec)
        if self._last_adapted[0] != key:
            ahead = self._prefetched.pop(key, None)
            self._last_adapted = (key, ahead.result() if ahead is not None else self._adapt_now(helm_spec))
        return self._last_adapted[1]

    def _prefetch(self, helm_spec, run_id: str, finisher: ThreadPoolExecutor) -> None:
        key = _spec_key(helm_spec)
        if key != self._last_adapted[0] and key not in self._prefetched:
            def adapt():
                RunLog.current.run = run_id
                return self._adapt_now(helm_spec)

            self._prefetched[key] = finisher.submit(adapt)

    def _adapt_now(self, helm_spec) -> tuple:
        from helm.benchmark.adaptation.adapters.adapter_factory import AdapterFactory
        from helm.benchmark.data_preprocessor import DataPreprocessor
        from helm.benchmark.runner import downsample_eval_instances
        from helm.benchmark.scenarios.scenario import (
            EVAL_SPLITS,
            create_scenario,
            get_scenario_cache_path,
            with_instance_ids,
        )

        scenario = create_scenario(helm_spec.scenario_spec)
        instances = scenario.get_instances(get_scenario_cache_path(str(self._services.base), scenario.name))
        if any(i.id is None for i in instances):
            instances = with_instance_ids(instances)
        adapter_spec = helm_spec.adapter_spec
        if adapter_spec.max_eval_instances is not None:
            instances = downsample_eval_instances(instances, adapter_spec.max_eval_instances,
                                                  adapter_spec.eval_splits or EVAL_SPLITS)
        instances = DataPreprocessor(helm_spec.data_augmenter_spec).preprocess(instances, 1)
        states = AdapterFactory.get_adapter(adapter_spec, self._services.tokenizer_service).adapt(instances, 1)
        return scenario, states


def runtime_summary(calls: list[dict], num_requests: int, num_instances: int) -> dict:
    """Totals over a run's engine calls (`harness.helm.backend.EngineCall.to_json`)."""
    total = {k: sum(c[k] for c in calls) for k in ("wall_s", "prefill_s", "decode_s", "prompt_tokens",
                                                    "generated_tokens")}
    # calls cached before the runtime counted shared prefixes have no such field
    total["shared_prefix_tokens"] = sum(c.get("shared_prefix_tokens", 0) for c in calls)
    engine_s = total["prefill_s"] + total["decode_s"]
    peak: dict[str, int] = {}
    for c in calls:
        for tier, value in c.get("peak_memory", {}).items():
            peak[tier] = max(peak.get(tier, 0), value)
    return {**total, "engine_calls": len(calls), "requests": num_requests, "instances": num_instances,
            "throughput_tok_s": total["generated_tokens"] / engine_s if engine_s > 0 else None,
            "prompt_tok_s": total["prompt_tokens"] / engine_s if engine_s > 0 else None,
            "peak_memory": peak}


class _HelmServices:
    """HELM's tokenizer and metric services over a local context without a request cache (ours is per run)."""

    def __init__(self, base: Path) -> None:
        from helm.benchmark.annotation_executor import AnnotationExecutionSpec, AnnotationExecutor
        from helm.benchmark.metrics.metric_service import MetricService
        from helm.benchmark.window_services.tokenizer_service import TokenizerService
        from helm.common.cache_backend_config import BlackHoleCacheBackendConfig
        from helm.common.local_context import LocalContext

        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):  # HELM prints "Looking in path: ..." for each context
            context = LocalContext(base_path=str(base / "prod_env"),
                                   cache_backend_config=BlackHoleCacheBackendConfig())
            self.annotator_executor = AnnotationExecutor(AnnotationExecutionSpec(local_path=str(base / "prod_env"),
                                                                                 parallelism=1))
        self.tokenizer_service = TokenizerService(context)
        self.metric_service = MetricService(context)


def _import_helm_classes(helm_specs) -> None:
    """Import the scenario, adapter and metric classes here, in the main thread: the finisher thread adapts and
    computes metrics, and some of HELM's modules install signal handlers when imported (main thread only)."""
    import importlib

    import helm.benchmark.adaptation.adapters.adapter_factory  # noqa: F401  (every adapter)
    import helm.benchmark.metrics.metric  # noqa: F401

    for spec in helm_specs:
        for class_name in [spec.scenario_spec.class_name, *(m.class_name for m in spec.metric_specs)]:
            importlib.import_module(class_name.rsplit(".", 1)[0])


def _spec_key(helm_spec) -> str:
    return json_io.dumps(json_io.to_tree(helm_spec), compact=True)


def _resolved(outcome: RunOutcome) -> Future:
    f: Future = Future()
    f.set_result(outcome)
    return f


def summary_line(o: RunOutcome) -> str:
    if o.status == "skipped":
        return f"  skipped  {o.run_id} (finished before)"
    if o.status == "failed":
        return f"  FAILED   {o.run_id}: {o.error} (see its run.log)"
    if o.status == "busy":
        return f"  busy     {o.run_id}: another flexhelm run is computing it ({o.error}); left to it"
    return f"  done     {o.run_id} in {o.wall_s:.1f} s ({o.runtime_s:.1f} s in the runtime)"
