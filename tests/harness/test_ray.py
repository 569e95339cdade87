"""The Ray executor (`flexhelm run --executor ray`, harness/suites/ray_runner.py) on a local Ray instance of 2 CPUs that
the module starts once (its start-up time is printed): a suite on Ray reports what the local executor reports, a killed
worker's run is retried and resumed from its cache, Ray's memory reservation keeps two big runs off one node at
once, and a bad input fails once."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time

import pytest

pytest.importorskip("helm")

from harness.suites.runner import SuiteRunner  # noqa: E402
from harness.suites.suite import load_suite  # noqa: E402
from tests.harness.fake_runtime import (  # noqa: E402
    SAME_FILES,
    FakeRuntime,
    duplicate_keys,
    recorded,
    run_suite,
    same_as,
    suite_text,
)

pytestmark = pytest.mark.usefixtures("nltk_in_tmp")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the `ray` extra")
NODE_MEMORY = 6 * 2**30
"""Ray's `memory` resource of the test's node: runs of more than half of it cannot share it."""


@pytest.fixture(scope="module")
def ray_node(tmp_path_factory, request):
    """A local Ray instance (2 CPUs) for the module; yields the FLEXHELM_CACHE of its workers."""
    import ray

    from harness.suites.ray_runner import local_temp_dir

    cache = tmp_path_factory.mktemp("ray-cache")
    with pytest.MonkeyPatch.context() as env:  # the workers' environment is this process's at start
        env.setenv("NLTK_DATA", str(tmp_path_factory.getbasetemp() / "nltk"))
        env.setenv("FLEXHELM_CACHE", str(cache))
        started = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
                 _node_ip_address="127.0.0.1", _memory=NODE_MEMORY,  # a new instance, never a cluster running here
                 _temp_dir=local_temp_dir())
        took = time.perf_counter() - started
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nRay start-up (a local instance, 2 CPUs): {took:.1f} s", flush=True)
    yield cache
    ray.shutdown()


def _ray_runner(results, scratch, runtime=None):
    """Runs of one CPU each (two at once on the test's node, where their RAM allows)."""
    from harness.suites.ray_runner import RayOptions, RayRunner

    return RayRunner(results, RayOptions(cpus_per_run=1, scratch=str(scratch)), backend_factory=runtime,
                     progress=False)


def _suite(tmp_path, model, rest: str, name: str = "ray"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(suite_text(name, model, rest))
    return path


def _batch(processed: dict) -> int:
    """The batch size of the run that processed a `recorded` request."""
    return json.loads(processed["policy"])["gpu_batch_size"]


def _whole_run_folders(suite_dir) -> None:
    """Every run folder is finished, and no temporary file of an interrupted write is left."""
    for run_dir in suite_dir.glob("tiny--*"):
        assert (run_dir / "done.json").is_file(), run_dir.name
        assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == [".lock"], run_dir.name


@needs_ray
def test_a_suite_on_ray_reports_what_the_local_executor_reports(ray_node, tmp_path, tiny_opt, capsys):
    """The real runtime on the tiny model through `flexhelm run --executor ray` (by default a run has the node's 2
    CPUs and its RAM): every metric of the report equals the local run's exactly, the local run also with 2 torch
    threads (fp32 sums depend on how threads split them)."""
    import torch

    from harness.cli import main
    from harness.reports.report import build_report

    folder, _ = tiny_opt()
    path = _suite(tmp_path, folder, """\
scenarios:
  - run: lambada:method=greedy
    name: lambada
    max_instances: 3
  - run: synthetic:num_prompts=4,prompt_len=12,output_len=3
    name: synthetic
variants:
  - name: fp16
    batch_sizes: [2]
  - name: w4
    compress: weights
    batch_sizes: [2]
""")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        local = SuiteRunner(tmp_path / "local", progress=False).run(load_suite(path))
    finally:
        torch.set_num_threads(threads)
    assert [o.status for o in local] == ["done"] * 4
    capsys.readouterr()
    assert main(["run", str(path), "--results", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    out = capsys.readouterr().out
    assert out.count("  done     tiny--") == 4 and "suite ray: 4 run now, 0 finished before, 0 failed" in out

    ours, theirs = build_report(tmp_path / "ray" / "ray"), build_report(tmp_path / "local" / "ray")
    timing = {"throughput_tok_s", "prompt_tok_s", "prefill_s", "decode_s", "engine_wall_s", "harness_s",
              "inference_runtime", "inference_denoised_runtime"}
    metrics = [c for c in theirs.columns if c not in timing and not c.startswith("peak_")]
    assert list(ours.columns) == list(theirs.columns) and {"main_se", "logprob", "perplexity"} <= set(metrics)
    import pandas as pd

    pd.testing.assert_frame_equal(ours[metrics], theirs[metrics], check_exact=True)
    _whole_run_folders(tmp_path / "ray" / "ray")
    assert not list((ray_node / "ray-runs").glob("*/ray/tiny--*"))  # the nodes' scratch run folders are gone
    # the same command again: every run is finished, none is sent
    assert main(["run", str(path), "--results", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert "suite ray: 0 run now, 4 finished before, 0 failed" in capsys.readouterr().out


SLOW_PAIR = """\
scenarios:
  - run: synthetic:num_prompts=12,prompt_len=8,output_len=2
    name: synthetic
variants:
  - name: fp16
    batch_sizes: [2, 3]
"""


@needs_ray
def test_a_killed_worker_is_retried_and_resumes_from_its_cache(ray_node, tmp_path, tiny_opt):
    """SIGKILL of the Ray worker computing a run: Ray runs it again, the retry resumes from the request cache the
    killed attempt left on the node (nothing finished is lost or computed twice), the suite completes as a clean
    local run does, and no run folder is left half-written. While in flight the run's folder is locked on the
    driver (a local `flexhelm run` of the suite reports it busy)."""
    from harness.suites import run_lock

    folder, _ = tiny_opt()
    path = _suite(tmp_path, folder, SLOW_PAIR)
    run_suite(path, tmp_path / "clean", FakeRuntime())
    victim = "tiny--synthetic--fp16--b2"
    scratch = tmp_path / "scratch"
    seen: dict = {}

    def kill_mid_run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            caches = list(scratch.glob(f"*/ray/{victim}/requests.jsonl"))
            if caches and caches[0].read_bytes().count(b"\n") >= 2:
                seen["driver_lock_held"] = run_lock.try_lock(tmp_path / "r" / "ray" / victim) is None
                seen["pid"] = pid = int((caches[0].parent / ".lock").read_text().split()[1])
                os.kill(pid, signal.SIGKILL)
                while os.path.exists(f"/proc/{pid}"):
                    time.sleep(0.001)
                data = caches[0].read_bytes()  # what the killed attempt left
                seen["lines"] = data[:data.rfind(b"\n") + 1].splitlines()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_mid_run)
    watcher.start()
    record = tmp_path / "processed.jsonl"
    runner = _ray_runner(tmp_path / "r", scratch, FakeRuntime(delay_s=0.3, record=str(record)))
    outcomes = runner.run(load_suite(path))
    watcher.join()
    assert seen.get("lines"), "the run ended before its worker could be killed"
    assert [o.status for o in outcomes] == ["done", "done"], outcomes
    assert runner.attempts == {victim: 2, "tiny--synthetic--fp16--b3": 1} and seen["driver_lock_held"]
    final = (tmp_path / "r" / "ray" / victim / "requests.jsonl").read_bytes().splitlines()
    assert final[:len(seen["lines"])] == seen["lines"] and len(final) == 6  # kept, then the rest once
    cached = sum(len(json.loads(line)["results"]) for line in seen["lines"])
    retried = [r for r in recorded(record) if _batch(r) == 2 and r["pid"] != seen["pid"]]
    assert 0 < cached < 12 and len(retried) == 12 - cached  # the retry computed only what was not finished
    assert duplicate_keys(tmp_path / "r" / "ray") == []
    for run_dir in (tmp_path / "clean" / "ray").glob("tiny--*"):
        for name in SAME_FILES:
            ours, clean = (tmp_path / "r" / "ray" / run_dir.name / name).read_text(), (run_dir / name).read_text()
            # a retry after a SIGKILL may say it was planned again (harness/suites/memory_watch.py)
            if name == "policy.json":
                ours, clean = (json.loads(text)["policy"] for text in (ours, clean))
            assert ours == clean, f"{run_dir.name}/{name}"
    _whole_run_folders(tmp_path / "r" / "ray")


@needs_ray
def test_a_run_begun_locally_resumes_on_ray_from_the_drivers_cache(ray_node, tmp_path, tiny_opt):
    """The driver sends its copy of a run's request cache with the task: batches finished by an interrupted local
    `flexhelm run` are not computed again on the node."""
    from tests.harness.fake_runtime import InjectedCrash

    folder, _ = tiny_opt()
    path = _suite(tmp_path, folder, SLOW_PAIR)
    run_suite(path, tmp_path / "clean", FakeRuntime())
    with pytest.raises(InjectedCrash):
        run_suite(path, tmp_path / "r", FakeRuntime(crash_at_batch=3))
    cache = tmp_path / "r" / "ray" / "tiny--synthetic--fp16--b2" / "requests.jsonl"
    before = cache.read_bytes().splitlines()
    assert len(before) == 3
    record = tmp_path / "processed.jsonl"
    outcomes = _ray_runner(tmp_path / "r", tmp_path / "scratch", FakeRuntime(record=str(record))).run(load_suite(path))
    assert [o.status for o in outcomes] == ["done", "done"]
    assert cache.read_bytes().splitlines()[:3] == before and duplicate_keys(tmp_path / "r" / "ray") == []
    assert [_batch(r) for r in recorded(record)].count(2) == 12 - 3 * 2  # the 3 cached batches were not sent
    same_as(tmp_path / "clean" / "ray", tmp_path / "r" / "ray")


def _two_runs(tmp_path, model, host: str, name: str):
    return _suite(tmp_path, model, f"""\
scenarios:
  - run: synthetic:num_prompts=6,prompt_len=8,output_len=2
    name: synthetic
variants:
  - name: fp16
    batch_sizes: [2, 3]
    memory: {{host: {host}}}
""", name)


@needs_ray
def test_runs_that_cannot_share_a_nodes_memory_never_run_at_once(ray_node, tmp_path, tiny_opt):
    """Two runs of 3.5 GiB each on a node of 6 GiB: Ray runs one after the other. The same runs at 1 GiB each
    meet inside their first batch (a rendezvous of both), proof that the executor runs two at once where they fit."""
    folder, _ = tiny_opt()
    big = _ray_runner(tmp_path / "big", tmp_path / "scratch", FakeRuntime(delay_s=0.2))
    assert [o.status for o in big.run(load_suite(_two_runs(tmp_path, folder, "3.5GiB", "big")))] == ["done"] * 2
    (_, _, start_a, end_a), (_, _, start_b, end_b) = sorted(big.placements, key=lambda p: p[2])
    assert end_a <= start_b

    small = _ray_runner(tmp_path / "small", tmp_path / "scratch",
                        FakeRuntime(rendezvous=(str(tmp_path / "meet"), 2)))
    assert [o.status for o in small.run(load_suite(_two_runs(tmp_path, folder, "1GiB", "small")))] == ["done"] * 2
    (_, _, start_a, end_a), (_, _, start_b, end_b) = sorted(small.placements, key=lambda p: p[2])
    assert start_b < end_a


@needs_ray
def test_a_bad_input_fails_once_with_its_error_and_keeps_its_work(ray_node, tmp_path, tiny_opt, monkeypatch):
    """A run whose backend raises (a bad input) fails once, not retried; its run.log and finished batch come back to
    the driver, and the next command resumes from them. A model the node cannot read fails once, saying so."""
    import shutil

    from harness.suites import ray_runner

    folder, _ = tiny_opt()
    gone = tmp_path / "gone"
    shutil.copytree(folder, gone)
    path = tmp_path / "bad.yaml"
    path.write_text(f"""\
suite: bad
models:
  - name: tiny
    path: {folder}
  - name: gone
    path: {gone}
scenarios:
  - run: synthetic:num_prompts=6,prompt_len=8,output_len=2
    name: synthetic
variants:
  - name: fp16
    batch_sizes: [2]
""")
    checked = ray_runner.helm_run_specs

    def check_then_lose_the_model(suite):  # the driver reads the model; the node does not find it
        specs = checked(suite)
        shutil.rmtree(gone, ignore_errors=True)
        return specs

    monkeypatch.setattr(ray_runner, "helm_run_specs", check_then_lose_the_model)
    suite = load_suite(path)
    runner = _ray_runner(tmp_path / "r", tmp_path / "scratch", FakeRuntime(error_at_batch=1))
    failed = runner.run(suite)
    assert [o.status for o in failed] == ["failed", "failed"] and runner.attempts == {o.run_id: 1 for o in failed}
    assert failed[0].error == "ValueError: bad input injected at batch 1"
    assert failed[1].error.startswith(f"the model folder {gone} is not readable on node ")
    run_dir = tmp_path / "r" / "bad" / "tiny--synthetic--fp16--b2"
    assert "ValueError: bad input injected at batch 1" in (run_dir / "run.log").read_text()
    assert (run_dir / "requests.jsonl").read_bytes().count(b"\n") == 1 and not (run_dir / "done.json").exists()

    record = tmp_path / "processed.jsonl"
    again = _ray_runner(tmp_path / "r", tmp_path / "scratch", FakeRuntime(record=str(record))).run(suite)
    assert [o.status for o in again] == ["done", "failed"]
    assert len(recorded(record)) == 6 - 2  # the failed attempt's finished batch came back and is not sent again
    assert duplicate_keys(tmp_path / "r" / "bad") == []
    assert json.loads((run_dir / "runtime.json").read_text())["engine_calls"] == 3


def test_ray_flags_without_ray(tmp_path, suite_file, monkeypatch, capsys):
    """Without Ray installed `--executor ray` is one line naming the extra; Ray's flags need `--executor ray`."""
    import sys

    from harness.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["run", str(suite_file), "--results", str(tmp_path / "r"), "--executor", "ray"]) == 2
    assert capsys.readouterr().err == ("flexhelm: error: --executor ray needs Ray on this machine and on every node: "
                                       "pip install 'flexhelm[ray]'\n")
    assert main(["run", str(suite_file), "--address", "auto", "--cpus-per-run", "2"]) == 2
    assert "--address, --cpus-per-run only apply with --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_what_ray_reserves_for_a_run(tmp_path, tiny_opt):
    """By default a node's worth (the smallest node's CPUs and RAM, so a run lands anywhere), a GPU where the cluster
    has them; `cpus_per_run` and the variant's `memory.host` make it less; never more than the largest node has."""
    from harness.suites.ray_runner import RayOptions, task_resources

    folder, _ = tiny_opt()
    path = _suite(tmp_path, folder, """\
scenarios:
  - run: synthetic:num_prompts=2,prompt_len=8,output_len=2
    name: synthetic
variants:
  - name: plain
  - name: limited
    memory: {host: 3GiB}
  - name: huge
    memory: {host: 100GiB}
""")
    plain, limited, huge = load_suite(path).runs
    head = {"CPU": 0.0, "memory": 2**30}  # a head node started with --num-cpus 0 computes nothing
    small = {"CPU": 8.0, "memory": 16 * 2**30}
    big = {"CPU": 16.0, "memory": 64 * 2**30}
    gpus = {"CPU": 4.0, "GPU": 2.0, "memory": 8 * 2**30}
    whole = RayOptions()
    assert task_resources(plain, whole, [head, small, big]) == {"num_cpus": 8, "num_gpus": 0, "memory": 16 * 2**30}
    assert task_resources(limited, RayOptions(cpus_per_run=2), [small, big]) == {"num_cpus": 2, "num_gpus": 0,
                                                                                "memory": 3 * 2**30}
    assert task_resources(huge, RayOptions(cpus_per_run=32), [small, big]) == {"num_cpus": 16, "num_gpus": 0,
                                                                              "memory": 64 * 2**30}
    assert task_resources(plain, whole, [small, gpus]) == {"num_cpus": 4, "num_gpus": 1, "memory": 8 * 2**30}
    assert task_resources(plain, RayOptions(gpus_per_run=0), [small, gpus])["num_gpus"] == 0


def test_a_local_ray_instance_keeps_its_session_outside_the_virtualenv(tmp_path, monkeypatch):
    """Ray's workers refuse a temp dir inside $VIRTUAL_ENV and die at start while the driver waits for them forever
    (what hung these tests under nox, whose TMPDIR is inside the session's venv): a local instance's session folder
    goes to `$TMPDIR/ray`, or to /tmp/ray when that lies inside the active virtualenv."""
    import tempfile

    from harness.suites.ray_runner import local_temp_dir

    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    (venv / "tmp").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.setenv("VIRTUAL_ENV", str(venv))
    monkeypatch.setattr(tempfile, "tempdir", str(venv / "tmp"))
    assert local_temp_dir() == "/tmp/ray"
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    assert local_temp_dir() == str(elsewhere / "ray")
    monkeypatch.delenv("VIRTUAL_ENV")
    monkeypatch.setattr(tempfile, "tempdir", str(venv / "tmp"))
    assert local_temp_dir() == str(venv / "tmp" / "ray")
