"""Executors: a run's HELM request states in, the same states with results out, batch by batch.

The runner hands an executor an `ExecutionJob` (what to load: model folder and policy) rather than a loaded
backend, so that an executor may run batches in another process or on another machine and load the model there.
`LocalExecutor` runs them in this process and holds one loaded model at a time. Either way, each batch's results
go into the run's `RequestCache` as it finishes (on disk when `execute` returns), and requests whose results are
cached are never sent again.

A batch is one block of the policy (`Policy.block_size` requests), composed by `runtime.batching.plan_blocks` as
the engine composes its own (longest first; here by prompt text, since tokens are the backend's business): requests
of like length share a block and its padding, and one block is all a crash can lose.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from harness.suites.request_cache import RequestCache, request_key
from runtime import batching


@dataclass(frozen=True)
class ExecutionJob:
    model_dir: str
    policy: object
    """The runtime `Policy`; its `block_size` is the requests per batch."""
    model_identity: dict = field(default_factory=dict)
    """`request_cache.model_identity(model_dir)`: part of every cache key."""


@dataclass(frozen=True)
class BatchDone:
    """Progress report after each batch (cached or computed)."""

    requests: int
    prompt_tokens: int
    generated_tokens: int
    cached: bool


@dataclass
class ExecutionReport:
    """What an execution did: the cache keys of its requests, and seconds inside the runtime (benchmark W5)."""

    keys: list[str] = field(default_factory=list)
    """Request cache key of each state, in order."""
    load_s: float = 0.0
    """Loading the model (first use of the backend in this process)."""
    engine_s: float = 0.0
    """Engine calls of the batches computed now (cached batches cost nothing)."""


class Executor(Protocol):
    def execute(self, job: ExecutionJob, states: list, cache: RequestCache,
                on_batch: Callable[[BatchDone], None]) -> tuple[list, ExecutionReport]:
        """Fill in `result` of every state; batches of `job.policy.block_size`, each recorded in `cache` when
        done."""

    def release(self) -> None:
        """Free what the executor holds for the runs so far (a loaded model); called at a suite's end."""


class LocalExecutor:
    """Runs batches in this process on a backend from `backend_factory(model_dir, policy)`; by default it holds
    one `RuntimeBackend` at a time, for the current model folder and policy, and closes it (I/O threads,
    scratch files, the model's memory) when a run needs another: a suite of a hundred runs holds one model."""

    def __init__(self, backend_factory: Callable | None = None) -> None:
        self.backend_factory = backend_factory
        self._held: tuple[tuple, object] | None = None

    def execute(self, job: ExecutionJob, states: list, cache: RequestCache,
                on_batch: Callable[[BatchDone], None]) -> tuple[list, ExecutionReport]:
        from harness.helm.backend import with_result

        policy_json = job.policy.to_json()
        keys = [request_key(job.model_identity, policy_json, s.request) for s in states]
        report = ExecutionReport(keys)
        states = list(states)
        backend = None
        try:
            for part in batching.plan_blocks([len(s.request.prompt) for s in states], job.policy.block_size):
                results = {i: cache.get(keys[i]) for i in part}
                todo = [i for i in part if results[i] is None]
                calls: list[dict] = []
                if todo:
                    if backend is None:
                        t0 = time.perf_counter()
                        backend = self._backend(job)
                        report.load_s += time.perf_counter() - t0
                    out = backend.process_batch([states[i].request for i in todo])
                    calls = [c.to_json() for c in out.calls]
                    report.engine_s += sum(c["wall_s"] for c in calls)
                    results.update(zip(todo, out.results))
                    # failures are not cached: a rerun retries them (HELM's rule below then stops this run)
                    cache.add_batch([(keys[i], results[i]) for i in todo if results[i].success], calls)
                for i in part:
                    states[i] = with_result(states[i], results[i])
                on_batch(BatchDone(len(part), sum(c["prompt_tokens"] for c in calls),
                                   sum(c["generated_tokens"] for c in calls), cached=not todo))
        finally:
            cache.flush()  # finished batches are on disk before the run goes on (or the error goes up)
        return states, report

    def _backend(self, job: ExecutionJob):
        if self.backend_factory is not None:
            return self.backend_factory(job.model_dir, job.policy)
        key = (job.model_dir, json.dumps(job.policy.to_json(), sort_keys=True))
        if self._held is None or self._held[0] != key:
            from harness.helm.backend import RuntimeBackend

            self.release()
            self._held = (key, RuntimeBackend(job.model_dir, job.policy))
        return self._held[1]

    def release(self) -> None:
        """Close the backend held for the last run (the suite's end, or another model or policy next)."""
        held, self._held = self._held, None
        if held is not None:
            held[1].engine.close()
            del held
            gc.collect()  # the model's tensors go now, not at some later collection

