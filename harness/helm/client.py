"""HELM's way in: a `Client` whose requests are collected into batches, and a runner that skips the collecting.

HELM's executor calls `Client.make_request` once per request, from `--num-threads` threads at once
(`helm-run -n`, default 4). `FlexhelmClient` hands each request to a `BatchCollector`, which runs
`RuntimeBackend.process` on everything that arrived together (dispatch when `max_batch` requests wait, or
once no new one has arrived for `idle_ms`) and wakes each caller with its result. So the batch reaching
the engine is as large as the number of threads: `helm-run -n 64 ...` gives batches of up to 64.

`BatchRunner` (`helm-run --runner-class-name harness.helm.client.BatchRunner`) goes further: its executor
hands all of a run's requests for flexhelm models to the backend at once (in chunks of `max_batch`),
through HELM's documented runner hook rather than by patching HELM; other models run as usual.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.executor import ExecutionSpec, Executor
from helm.benchmark.model_deployment_registry import get_model_deployment
from helm.benchmark.runner import Runner
from helm.clients.client import Client
from helm.common.general import parallel_map
from helm.common.hierarchical_logger import hlog
from helm.common.request import Request, RequestResult

from harness.helm.backend import RuntimeBackend, get_backend, with_result
from runtime import batching

CLIENT_CLASS = "harness.helm.client.FlexhelmClient"
DEFAULT_MAX_BATCH = 256
DEFAULT_IDLE_MS = 30.0


class FlexhelmClient(Client):
    """A HELM client for a local checkpoint on flexhelm's runtime (constructed by HELM from a ModelDeployment)."""

    def __init__(self, model_dir: str, policy: str | None = None, offload_dir: str | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, idle_ms: float = DEFAULT_IDLE_MS) -> None:
        self.backend = get_backend(model_dir, policy, offload_dir)
        self.collector = get_collector(self.backend, max_batch, idle_ms)

    def make_request(self, request: Request) -> RequestResult:
        return self.collector.submit(request)


@dataclass(eq=False)
class _Slot:
    request: Request
    done: threading.Event = field(default_factory=threading.Event)
    result: RequestResult | None = None
    error: BaseException | None = None


class BatchCollector:
    """Gathers requests from many threads into batches for one `process(list) -> list` function.

    A single worker thread (started on the first request) waits for a first request, then keeps the batch
    open until `max_batch` requests wait or `idle_s` passes with no new arrival, and runs it. Requests
    arriving meanwhile form the next batch.
    """

    def __init__(self, process: Callable[[list[Request]], list[RequestResult]], max_batch: int = DEFAULT_MAX_BATCH,
                 idle_s: float = DEFAULT_IDLE_MS / 1000) -> None:
        if max_batch < 1 or idle_s < 0:
            raise ValueError(f"max_batch ({max_batch}) must be >= 1 and idle_s ({idle_s}) >= 0")
        self.process, self.max_batch, self.idle_s = process, max_batch, idle_s
        self.batch_sizes: list[int] = []
        """Size of every batch dispatched so far."""
        self._cv = threading.Condition()
        self._pending: list[_Slot] = []
        self._last_arrival = 0.0
        self._worker: threading.Thread | None = None

    def submit(self, request: Request) -> RequestResult:
        """Queue `request`, block until its batch has run, and return its result."""
        slot = _Slot(request)
        with self._cv:
            self._pending.append(slot)
            self._last_arrival = time.monotonic()
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="flexhelm-batcher", daemon=True)
                self._worker.start()
            self._cv.notify()
        slot.done.wait()
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    def _next_batch(self) -> list[_Slot]:
        with self._cv:
            while not self._pending:
                self._cv.wait()
            while len(self._pending) < self.max_batch:
                left = self._last_arrival + self.idle_s - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            self.batch_sizes.append(len(batch))
            try:
                results = self.process([s.request for s in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} requests returned {len(results)} results")
                for s, r in zip(batch, results):
                    s.result = r
            except BaseException as e:  # deliver to the callers: this thread must outlive any one batch
                for s in batch:
                    s.error = e
            finally:
                for s in batch:
                    s.done.set()


_COLLECTORS: dict[int, BatchCollector] = {}
_COLLECTORS_LOCK = threading.Lock()


def get_collector(backend: RuntimeBackend, max_batch: int = DEFAULT_MAX_BATCH,
                  idle_ms: float = DEFAULT_IDLE_MS) -> BatchCollector:
    """One collector per backend, so that every client of a model (HELM may build several) feeds one queue."""
    with _COLLECTORS_LOCK:
        key = id(backend)  # backends live for the process (cached in harness.helm.backend), so ids stay unique
        if key not in _COLLECTORS:
            _COLLECTORS[key] = BatchCollector(backend.process, max_batch, idle_ms / 1000)
        return _COLLECTORS[key]


def deployment_backend(deployment_name: str) -> tuple[RuntimeBackend, int] | None:
    """The backend and chunk size of a flexhelm model deployment; None for any other deployment."""
    deployment = get_model_deployment(deployment_name)
    spec = deployment.client_spec
    if spec.class_name != CLIENT_CLASS:
        return None
    args = spec.args
    backend = get_backend(args["model_dir"], args.get("policy"), args.get("offload_dir"))
    return backend, int(args.get("max_batch", DEFAULT_MAX_BATCH))


class BatchExecutor(Executor):
    """An `Executor` that sends a run's flexhelm requests to the runtime in whole batches, not one by one."""

    def execute(self, scenario_state: ScenarioState) -> ScenarioState:
        if self.execution_spec.dry_run or self.execution_spec.url:  # remote: the runtime lives on the server
            return super().execute(scenario_state)
        states = list(scenario_state.request_states)
        backends = {name: deployment_backend(name) for name in {s.request.model_deployment for s in states}}
        ours: dict[str, list[int]] = {}
        others: list[int] = []
        for i, s in enumerate(states):
            name = s.request.model_deployment
            (ours.setdefault(name, []) if backends[name] else others).append(i)
        if others:
            done = parallel_map(self.process, [states[i] for i in others], self.execution_spec.parallelism)
            for i, s in zip(others, done):
                states[i] = s
        for name, indices in ours.items():
            backend, chunk = backends[name]
            # composed as the engine composes blocks (longest first), here by prompt text
            for block in batching.plan_blocks([len(states[i].request.prompt) for i in indices], chunk):
                part = [indices[j] for j in block]
                results = backend.process([states[i].request for i in part])
                for i, result in zip(part, results):
                    states[i] = with_result(states[i], result)
            hlog(f"flexhelm: {len(indices)} requests to {name} in batches of up to {chunk}")
        return ScenarioState(adapter_spec=scenario_state.adapter_spec, request_states=states,
                             annotator_specs=scenario_state.annotator_specs)


class BatchRunner(Runner):
    """HELM's `Runner` with the `BatchExecutor`: `helm-run --runner-class-name harness.helm.client.BatchRunner`."""

    def __init__(self, execution_spec: ExecutionSpec, *args, **kwargs) -> None:
        super().__init__(execution_spec, *args, **kwargs)
        self.executor = BatchExecutor(execution_spec)

