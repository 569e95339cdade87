"""The node's side of `flexhelm run --executor ray` (`harness.suites.ray_runner` is the driver's): one run of a suite
as a Ray task, computed by the local `SuiteRunner` in a node-local scratch results folder, its files sent back.

The scratch folder, `$FLEXHELM_CACHE/ray-runs/<driver key>/<suite>/<run>/` on the node, outlives the task: a task
that Ray starts again after its worker was killed finds the request cache the lost attempt left there and computes
only the batches it had not finished. The driver removes it (`forget_scratch`, a task pinned to that node) once it
has written the run. What the driver's own run folder already holds of the run (`SEED_FILES`) comes with the task,
so a retry on another node, or a run begun by a local `flexhelm run`, resumes from it as well.
"""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from harness.suites import atomic, run_lock
from harness.suites.executor import LocalExecutor
from harness.suites.request_cache import whole_lines
from harness.suites.runner import RunOutcome, SuiteRunner
from harness.suites.suite import RunSpec, Suite

CACHE = "requests.jsonl"
SEED_FILES = (CACHE, "policy.json", "run.log")
"""What a run resumes from (its finished batches, its first plan, its log): sent from the driver's run folder."""


@dataclass(frozen=True)
class NodeJob:
    """What a run's task gets: the run (as a suite of that one run), where to compute it, what to resume from."""

    suite: Suite
    """A suite of this one run, its model and its scenario."""
    driver_key: str
    """Names this driver's results folder's scratch folder on every node."""
    seed: dict
    """Name -> bytes of the driver's `SEED_FILES` of the run (those it has)."""
    ram: int
    """Bytes of RAM Ray reserved for the run: the limit of its `auto` plan on the node."""
    cpus: int
    """Torch threads of the run: the CPUs Ray reserved for it."""
    scratch: str | None
    """`RayOptions.scratch`: the nodes' folder of runs in progress (None: `$FLEXHELM_CACHE/ray-runs`)."""
    backend_factory: object = None
    """`LocalExecutor`'s backend factory (tests: a fake runtime); None: the real runtime."""

    @property
    def run(self) -> RunSpec:
        return self.suite.runs[0]


@dataclass(frozen=True)
class NodeResult:
    """A task's answer: the run's outcome on its node and the run folder's files (none when `busy`)."""

    outcome: RunOutcome
    node: str
    """The node's host name (for messages)."""
    node_id: str
    """Ray's id of the node (the scratch folder is removed there once the driver has the files)."""
    files: dict
    started: float
    """`time.time()` when the task began and ended on its node."""
    ended: float


def run_on_node(job: NodeJob, tracker) -> NodeResult:
    """A Ray task: compute `job`'s run with the local `SuiteRunner` in this node's scratch folder and return the
    run folder's files. A bad input is a `failed` outcome (returned, so never retried); only a lost worker or node
    makes Ray run this again, and then it resumes from what the lost attempt left here."""
    import ray

    started, node, run = time.time(), socket.gethostname(), job.run
    node_id = ray.get_runtime_context().get_node_id()
    tracker.started.remote(run.id, node)  # not waited for: a task blocked in ray.get lends its CPUs to another
    results = scratch_root(job.scratch) / job.driver_key
    run_dir = results / run.suite / run.id

    def answer(outcome: RunOutcome, files: dict) -> NodeResult:
        return NodeResult(outcome, node, node_id, files, started, time.time())

    if not (Path(run.model.path) / "config.json").is_file():
        return answer(RunOutcome(run.id, "failed", error=(
            f"the model folder {run.model.path} is not readable on node {node}: every node needs the checkpoint at "
            "the same path (shared storage, or the same copy on each)")), {})
    lock = run_lock.try_lock(run_dir)  # the seed must not be laid under a task still computing here
    if lock is None:
        return answer(RunOutcome(run.id, "busy", error=run_lock.holder(run_dir)), {})
    try:
        _seed(run_dir, job.seed)
    finally:
        lock.release()
    import torch

    torch.set_num_threads(job.cpus)  # a reused worker keeps the threads of its last task otherwise
    runner = SuiteRunner(results, LocalExecutor(job.backend_factory), progress=False, ram_limit=job.ram)
    try:
        [outcome] = runner.run(job.suite)
    except Exception as e:  # refused before it began (HELM's checks on this node): a bad input, not a lost node
        outcome = RunOutcome(run.id, "failed", error=f"{type(e).__name__}: {e}")
    if outcome.status == "busy":
        return answer(outcome, {})
    files = {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())
             if p.is_file() and not p.name.startswith(".")}  # not the lock, nor a temporary file of a killed write
    return answer(outcome, files)


def _seed(run_dir: Path, seed: dict) -> None:
    """Lay the driver's copies of the run's resume files into its scratch folder. A file the folder already has
    went on from an earlier copy of the driver's (a lost attempt on this node), so it stays; of the request cache
    both files' finished batches (whole lines) are kept."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in seed.items():
        path = run_dir / name
        if not path.is_file():
            atomic.write_bytes(path, data)
        elif name == CACHE:
            have = whole_lines(path.read_bytes())
            known = set(have.splitlines())
            extra = [line for line in whole_lines(data).splitlines() if line not in known]
            if extra:
                atomic.write_bytes(path, have + b"\n".join(extra) + b"\n")


def scratch_root(option: str | None) -> Path:
    """This node's folder of runs in progress."""
    from runtime.hardware import cache_root

    return Path(option).expanduser() if option else cache_root() / "ray-runs"


def forget_scratch(scratch: str | None, driver_key: str, run: RunSpec) -> None:
    """A Ray task on the node that computed `run`: its scratch folder goes once the driver has written the run."""
    shutil.rmtree(scratch_root(scratch) / driver_key / run.suite / run.id, ignore_errors=True)
