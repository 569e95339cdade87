"""Requests from HELM's threads reach the engine together: the collector and the batch executor."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("helm")

from helm.benchmark.adaptation.adapter_spec import AdapterSpec  # noqa: E402
from helm.benchmark.adaptation.request_state import RequestState  # noqa: E402
from helm.benchmark.adaptation.scenario_state import ScenarioState  # noqa: E402
from helm.benchmark.executor import ExecutionSpec  # noqa: E402
from helm.benchmark.scenarios.scenario import Input, Instance  # noqa: E402
from helm.common.authentication import Authentication  # noqa: E402
from helm.common.request import Request, RequestResult  # noqa: E402

from harness.helm.client import BatchCollector, BatchExecutor, FlexhelmClient  # noqa: E402


def fake_process(calls):
    def process(requests):
        calls.append(len(requests))
        return [RequestResult(success=True, embedding=[], completions=[], cached=False, error=r.prompt)
                for r in requests]
    return process


def submit_all(submit, prompts):
    start = threading.Barrier(len(prompts))

    def one(p):
        start.wait()  # all threads ask at once, as HELM's executor threads do
        return submit(Request(prompt=p))

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_concurrent_requests_form_one_batch():
    calls = []
    collector = BatchCollector(fake_process(calls), max_batch=64, idle_s=0.2)
    prompts = [f"p{i}" for i in range(12)]
    results = submit_all(collector.submit, prompts)
    assert calls == [12] and collector.batch_sizes == [12]
    assert [r.error for r in results] == prompts  # each caller gets its own result


def test_batches_never_exceed_max_batch():
    calls = []
    collector = BatchCollector(fake_process(calls), max_batch=4, idle_s=0.2)
    submit_all(collector.submit, [f"p{i}" for i in range(10)])
    assert sum(calls) == 10 and max(calls) == 4


def test_a_failing_batch_raises_in_every_caller_and_the_next_one_runs():
    state = {"fail": True}

    def process(requests):
        if state.pop("fail", False):
            raise RuntimeError("boom")
        return fake_process([])(requests)

    collector = BatchCollector(process, max_batch=8, idle_s=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        collector.submit(Request(prompt="a"))
    assert collector.submit(Request(prompt="b")).error == "b"


def test_client_threads_reach_the_engine_in_one_call(tiny_opt):
    folder, _ = tiny_opt()
    client = FlexhelmClient(str(folder), idle_ms=200)
    before = Counter(client.backend.engine.calls)  # the backend is shared: other tests' calls are not this one's
    prompts = [f"the fox {i}" for i in range(8)]
    req = lambda p: Request(model="flexhelm/t", model_deployment="flexhelm/t", prompt=p, temperature=0, max_tokens=3)
    results = submit_all(lambda r: client.make_request(req(r.prompt)), prompts)
    assert client.backend.engine.calls - before == {("generate", 8): 1}
    assert all(r.success and r.batch_size == 8 for r in results)
    assert FlexhelmClient(str(folder)).collector is client.collector  # HELM may build several clients


def test_batch_executor_hands_a_run_over_at_once(tiny_opt, tmp_path):
    from helm.benchmark.model_deployment_registry import ClientSpec, ModelDeployment, register_model_deployment

    folder, _ = tiny_opt()
    name = "flexhelm/executor-test"
    register_model_deployment(ModelDeployment(name=name, client_spec=ClientSpec(
        "harness.helm.client.FlexhelmClient", {"model_dir": str(folder), "max_batch": 5})))
    client = FlexhelmClient(str(folder))
    before = Counter(client.backend.engine.calls)
    states = [RequestState(instance=Instance(Input(text=f"doc {i}"), references=[]), reference_index=None,
                           request_mode=None, train_trial_index=0, output_mapping=None, result=None,
                           num_train_instances=0, prompt_truncated=False,
                           request=Request(model=name, model_deployment=name, prompt=f"</s>the sea {i}",
                                           echo_prompt=True, max_tokens=0, temperature=0))
              for i in range(12)]
    executor = BatchExecutor(ExecutionSpec(url=None, auth=Authentication(""), local_path=str(tmp_path),
                                           parallelism=1))
    out = executor.execute(ScenarioState(adapter_spec=AdapterSpec(), request_states=states))
    # chunks of the deployment's max_batch, not one request at a time, longest prompts first ("... 10", "... 11")
    assert client.backend.engine.calls - before == {("score", 5): 2, ("score", 2): 1}
    assert [s.result.batch_size for s in out.request_states] == [5] * 8 + [2] * 2 + [5] * 2
    assert [s.request.prompt for s in out.request_states] == [s.request.prompt for s in states]
