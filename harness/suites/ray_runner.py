"""`flexhelm run SUITE --executor ray`: a suite's runs spread over a Ray cluster, one Ray task per run.

The driver (the machine running `flexhelm run`) keeps what makes a suite resumable and safe, as the local runner
does: it checks the whole suite against HELM before anything is sent, skips finished runs (`done.json` naming the
run's key), and holds each unfinished run folder's lock (`harness.suites.run_lock`) while the run is in flight, so a
local `flexhelm run` of the same suite meanwhile reports that run `busy`. Each unfinished run becomes one Ray task that
runs the local `SuiteRunner` on that single run, on whichever node Ray places it: the same code computes it, so its
files and metrics are those a local run writes. A task per run (not per batch) because a run loads its model once,
its `auto` policy is planned where it computes (that node's RAM and hardware profile), and the only traffic is the
run's files at its end.

Where a task computes: a node-local scratch results folder (`harness.suites.ray_node`), where a retry on the same node
resumes from the request cache the lost attempt left; the driver ships its own copies of the run's resume files
with the task, so a retry elsewhere resumes too. The task returns the run folder's files as bytes through Ray's
object store (no shared filesystem for results); the driver writes each one atomically (`harness.suites.atomic`), the
request cache first and `done.json` last: a driver killed meanwhile leaves whole files and an unfinished run,
which the next command completes.

Failures: a worker or node lost mid-run is retried by Ray (`max_retries`); a run that fails on its node for a bad
input (scenario, model, policy) returns a `failed` outcome, which Ray does not retry (`retry_exceptions=False`
covers the rest): it fails once, its `run.log` comes back to the driver, and the suite goes on.

Resources, which Ray's scheduler reserves on the node it picks (`task_resources`): CPUs (also the run's torch
threads), a GPU where the cluster has them, and `memory`, the RAM the run may fill: by default a node's worth, as a
local run has its machine. The run's `auto` plan is made within that reservation, so by the planner's own
prediction the runs Ray puts on one node fit in its RAM together.

Models are not shipped: the checkpoint folder must be readable at the same path on every node (shared storage, or
the same copy everywhere); a node that cannot read it fails that run with one line saying so. Copying checkpoints of
tens of GB through the object store per node would cost more than the NFS mount a cluster has anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from harness.suites import atomic, run_lock
from harness.suites.progress import SuiteProgress
from harness.suites.ray_node import CACHE, SEED_FILES, NodeJob, NodeResult, forget_scratch, run_on_node
from harness.suites.runner import DONE, RunOutcome, SuiteRunner, helm_run_specs, summary_line
from harness.suites.suite import RunSpec, Suite
from runtime.errors import FlexhelmError

ENV_FOR_NODES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "FLEXHELM_DEFAULT_POLICY")
"""The driver's settings that change what a run computes: every node's workers get the driver's values."""


class RayError(FlexhelmError):
    """Ray is missing or its cluster cannot be reached; the message says what to do."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None
    """None: start a local Ray instance for this suite; `auto` or `HOST:PORT`: join that cluster."""
    max_retries: int = 3
    """Times Ray starts a run again whose worker or node was lost (a run that fails is not retried)."""
    cpus_per_run: int | None = None
    """Ray's `num_cpus` of each run, and its torch threads; None: the smallest node's CPUs (`task_resources`)."""
    gpus_per_run: float | None = None
    """Ray's `num_gpus` of each run; None: 1 where the cluster has GPUs, else 0."""
    scratch: str | None = None
    """Node-local folder of runs in progress; None: `$FLEXHELM_CACHE/ray-runs` on each node."""


def task_resources(run: RunSpec, options: RayOptions, nodes: list[dict]) -> dict:
    """What Ray reserves for `run` on the node it picks (`nodes`: the Ray resources of each alive node). By default a
    run has a node to itself, as a local run has its machine: the CPUs and the RAM (Ray's `memory`) of the smallest
    node, so it can land on any. `options.cpus_per_run` and the variant's `memory.host` (the RAM an `auto` plan may
    fill) make it smaller, so that several runs share a node. The run's `auto` plan stays within the reserved RAM;
    a GPU is reserved where the cluster has them (Ray hides every GPU from a task that asks for none). Nothing is
    more than the largest node has: a run asking for more would wait forever for a node that cannot exist."""
    workers = [n for n in nodes if n.get("CPU", 0) >= 1] or nodes  # not a head started with --num-cpus 0
    smallest = {key: min(n.get(key, 0) for n in workers) for key in ("CPU", "memory")}
    largest = {key: max(n.get(key, 0) for n in workers) for key in ("CPU", "GPU", "memory")}
    cpus = options.cpus_per_run if options.cpus_per_run is not None else smallest["CPU"]
    memory = run.variant.memory.get("host", smallest["memory"])
    gpus = options.gpus_per_run if options.gpus_per_run is not None else min(1, largest["GPU"])
    return {"num_cpus": min(cpus, largest["CPU"]), "num_gpus": min(gpus, largest["GPU"]),
            "memory": int(min(memory, largest["memory"]))}


class RayRunner:
    """`SuiteRunner.run`'s contract (one outcome per run, in suite order) with each run computed by a Ray task."""

    def __init__(self, results_dir: str | os.PathLike = "results", options: RayOptions | None = None,
                 backend_factory=None, progress: bool | None = None) -> None:
        self.local = SuiteRunner(results_dir, progress=progress)  # the run folders' layout and the resume rule
        self.options = options or RayOptions()
        self.backend_factory = backend_factory
        self.progress_enabled = progress
        key = f"{socket.gethostname()}:{self.local.results_dir.resolve()}"
        self.driver_key = hashlib.sha256(key.encode()).hexdigest()[:16]
        """Names this results folder's scratch folder on every node (`NodeJob.driver_key`)."""
        self.attempts: dict[str, int] = {}
        """Run id -> tasks started for it in the last `run` (a retried run counts 2 or more)."""
        self.placements: list[tuple[str, str, float, float]] = []
        """(run id, node, started, ended) of every task that returned, in the order they returned."""
        self._forgets: list = []
        """Tasks removing the scratch folders of the runs written back (waited for, briefly, at the end)."""

    def suite_dir(self, suite: Suite) -> Path:
        return self.local.suite_dir(suite)

    def is_finished(self, run: RunSpec) -> bool:
        return self.local.is_finished(run)

    def run(self, suite: Suite) -> list[RunOutcome]:
        """Run every unfinished run of `suite` on the cluster; a failed run is reported and the others go on."""
        helm_run_specs(suite)  # the whole suite is checked before anything is sent
        ray = import_ray()
        progress = SuiteProgress(len(suite.runs), self.progress_enabled)
        outcomes: dict[str, RunOutcome] = {}
        todo: list[tuple[RunSpec, run_lock.RunLock]] = []
        self.attempts, self.placements = {}, []
        try:
            for run in suite.runs:
                outcome, lock = self.local.claim(run)  # the local runner's claim: held on the driver while in flight
                if outcome is None:
                    todo.append((run, lock))
                else:
                    outcomes[run.id] = outcome
                    progress.end_run(summary_line(outcome))
            if todo:  # nothing to compute, no cluster to reach
                self._on_cluster(ray, suite, todo, outcomes, progress)
        finally:
            for _, lock in todo:
                lock.release()
            progress.close()
        return [outcomes[r.id] for r in suite.runs]

    def _on_cluster(self, ray, suite: Suite, todo: list, outcomes: dict, progress: SuiteProgress) -> None:
        """Send each run of `todo` to the cluster as a task and collect what comes back."""
        started_ray = connect(ray, self.options.address)
        flight: dict = {}  # ObjectRef -> (run, its folder's lock)
        self._forgets = []
        tracker = None
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            tracker = ray.remote(num_cpus=0, scheduling_strategy=here)(_Tracker).remote()  # lives as long as we do
            # Wait until it is up: a task's `started` call to an actor still being created waits in the task's
            # worker, and is lost with it if that worker dies first (the retry would then count as attempt 1).
            ray.get(tracker.state.remote())
            task = ray.remote(run_on_node)
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            for run, lock in todo:
                need = task_resources(run, self.options, nodes)
                ref = task.options(**need, max_retries=self.options.max_retries, retry_exceptions=False,
                                   name=run.id).remote(self._job(suite, run, need["memory"], need["num_cpus"]), tracker)
                flight[ref] = (run, lock)
            self._collect(ray, flight, outcomes, progress, tracker)
            if self._forgets:  # the nodes' scratch folders of the runs written here (best effort)
                ray.wait(self._forgets, num_returns=len(self._forgets), timeout=30)
        except BaseException:  # Ctrl-C, SIGTERM: stop the runs in flight; their finished batches stay on their nodes
            with contextlib.suppress(Exception):
                for ref in flight:
                    ray.cancel(ref, force=True)
            raise
        finally:
            if tracker is not None:
                with contextlib.suppress(Exception):
                    ray.kill(tracker)
            if started_ray:
                with keep_sigterm():
                    ray.shutdown()

    def _job(self, suite: Suite, run: RunSpec, ram: int, cpus: float) -> NodeJob:
        run_dir = self.local.run_dir(run)
        seed = {name: (run_dir / name).read_bytes() for name in SEED_FILES if (run_dir / name).is_file()}
        one = replace(suite, models=(run.model,), scenarios=(run.scenario,), runs=(run,))
        return NodeJob(one, self.driver_key, seed, ram, max(1, int(cpus)), self.options.scratch, self.backend_factory)

    def _collect(self, ray, flight: dict, outcomes: dict, progress: SuiteProgress, tracker) -> None:
        """Wait for the runs in flight; write each one's files as it returns; show where the others run."""
        announced: dict[str, int] = {}
        where: dict[str, str] = {}
        while flight:
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=1.0)
            for ref in ready:
                run, lock = flight.pop(ref)
                result = None
                try:
                    result = ray.get(ref)
                    outcome = self._commit(ray, run, result)
                except ray.exceptions.RayError as e:
                    outcome = RunOutcome(run.id, "failed", error=_task_error(ray, e, self.options.max_retries))
                except OSError as e:  # writing its files here (a full disk): that run fails, the others go on
                    outcome = RunOutcome(run.id, "failed", error=f"{type(e).__name__}: {e}")
                finally:
                    lock.release()
                outcomes[run.id] = outcome
                line = summary_line(outcome)
                if outcome.status == "done" and result.outcome.status == "skipped":
                    line = f"  done     {run.id} (finished on {result.node} by an attempt whose answer was lost)"
                elif outcome.status == "done":
                    line += f" on {result.node}"
                progress.end_run(line)
            with contextlib.suppress(ray.exceptions.RayError):  # only the progress view needs it
                where, self.attempts = ray.get(tracker.state.remote())
            for run, _ in flight.values():
                if announced.get(run.id, 0) < self.attempts.get(run.id, 0):
                    announced[run.id] = n = self.attempts[run.id]
                    again = f" (attempt {n}: the last one lost its worker or node)" if n > 1 else ""
                    progress.write(f"  started  {run.id} on {where[run.id]}{again}")
            progress.in_flight(_in_flight([run.id for run, _ in flight.values()], where))

    def _commit(self, ray, run: RunSpec, result: NodeResult) -> RunOutcome:
        """Write the run folder's files the task returned (each whole; the cache first, `done.json` last)."""
        self.placements.append((run.id, result.node, result.started, result.ended))
        outcome = result.outcome
        if outcome.status == "busy":  # another task of an earlier driver still holds it on that node
            return replace(outcome, error=f"{outcome.error}, on node {result.node}")
        run_dir = self.local.run_dir(run)
        for name in sorted(result.files, key=lambda n: (n == DONE, n != CACHE)):
            atomic.write_bytes(run_dir / name, result.files[name])
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        forget = ray.remote(forget_scratch).options(  # on the node that has it, or nowhere
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(result.node_id, soft=False))
        self._forgets.append(forget.remote(self.options.scratch, self.driver_key, run))
        if outcome.status == "skipped":  # finished on its node by an earlier task whose answer never arrived
            outcome = replace(outcome, status="done")
        return outcome


class _Tracker:
    """A Ray actor: the node each run's latest attempt started on, and how many attempts each run had."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {}
        self.attempts: dict[str, int] = {}

    def started(self, run_id: str, node: str) -> None:
        self.where[run_id] = node
        self.attempts[run_id] = self.attempts.get(run_id, 0) + 1

    def state(self) -> tuple[dict, dict]:
        return dict(self.where), dict(self.attempts)


# ---- the driver's connection ------------------------------------------------------------------------------------
def import_ray():
    try:
        import ray
    except ImportError:
        raise RayError("--executor ray needs Ray on this machine and on every node: "
                       "pip install 'flexhelm[ray]'") from None
    return ray


def connect(ray, address: str | None) -> bool:
    """Connect this process to Ray: True when it started the connection here (and so ends it after the suite);
    False when the caller had connected already (a test's cluster, a notebook)."""
    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in ENV_FOR_NODES if k in os.environ}
    extra = {"include_dashboard": False, "_temp_dir": local_temp_dir()} if address is None else {}
    try:
        with keep_sigterm():
            ray.init(address=address or "local", runtime_env={"env_vars": env}, log_to_driver=False,
                     logging_level="warning", **extra)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise RayError(f"cannot reach the Ray cluster at {address!r} ({type(e).__name__}: {e}); start it with "
                       "`ray start --head` (see README, Suites on a Ray cluster), or leave out --address to run "
                       "on a local Ray instance") from None
    return True


def local_temp_dir() -> str:
    """Where a local Ray instance keeps its session folder (sockets, logs): `$TMPDIR/ray`, unless that lies inside
    the active virtualenv (nox puts TMPDIR in the session's venv), where Ray's workers refuse it ("temp_dir must not
    be child directory of virtualenv root"), die at start, and leave the driver waiting for them forever: then
    `/tmp/ray`, Ray's own default, whose short path also keeps its Unix socket paths under the 107-byte limit."""
    root = os.path.join(tempfile.gettempdir(), "ray")
    venv = os.environ.get("VIRTUAL_ENV")
    if venv and Path(root).resolve().is_relative_to(Path(venv).resolve()):
        return "/tmp/ray"
    return root


@contextlib.contextmanager
def keep_sigterm():
    """Ray's init and shutdown replace this process's SIGTERM handler (by one that ends it at once, or the default):
    put back the suite's, which stops it as Ctrl-C does and prints the command that resumes it."""
    saved = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if saved is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, saved)


def _task_error(ray, e: Exception, max_retries: int) -> str:
    """One line for a task that ended in a Ray error."""
    if isinstance(e, ray.exceptions.RayTaskError):  # it raised past the runner's own catch: not retried
        cause = getattr(e, "cause", None) or e
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (f"{type(e).__name__} after {max_retries + 1} attempts (its worker or node was lost each time: {first}); "
            "the same command tries it again")


def _in_flight(run_ids: list[str], where: dict[str, str]) -> str:
    """`2 queued | node-a: run, run | node-b: run`: the runs in flight per node, for the suite's bar."""
    nodes: dict[str, list[str]] = {}
    for run_id in run_ids:
        nodes.setdefault(where.get(run_id, "queued"), []).append(run_id)
    queued = nodes.pop("queued", [])
    parts = ([f"{len(queued)} queued"] if queued else []) + [f"{n}: {', '.join(ids)}" for n, ids in nodes.items()]
    return " | ".join(parts)
