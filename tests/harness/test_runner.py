"""The suite runner: HELM's layout, crash and rerun equal to an uninterrupted run, nothing finished recomputed."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("helm")

from harness.executor import LocalExecutor  # noqa: E402
from harness.request_cache import RequestCache  # noqa: E402
from harness.runner import SuiteRunner  # noqa: E402
from harness.suite import load_suite  # noqa: E402
from tests.harness.fake_runtime import FakeRuntime, InjectedCrash, suite_text  # noqa: E402

HELM_FILES = ("run_spec.json", "scenario.json", "scenario_state.json", "stats.json", "per_instance_stats.json")
OUR_FILES = ("policy.json", "env.json", "runtime.json", "flexhelm_run.json", "run.log", "done.json")
SAME_FILES = ("scenario_state.json", "stats.json", "per_instance_stats.json", "runtime.json", "policy.json",
              "run_spec.json")
SCENARIOS_VARIANTS = """\
scenarios:
  - run: lambada:method=greedy
    name: lambada
    max_instances: 10
  - run: wikitext
    max_instances: 1
  - run: synthetic:num_prompts=6,prompt_len=16,output_len=4
    name: synthetic
    batch_sizes: [2, 4]
variants:
  - name: fp16
    batch_sizes: [3]
  - name: 4bit
    compress: weights
    batch_sizes: [3]
"""


@pytest.fixture(autouse=True)
def _nltk_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NLTK_DATA", str(tmp_path_factory.getbasetemp() / "nltk"))


@pytest.fixture
def suite_file(tmp_path, tiny_opt):
    folder, _ = tiny_opt()
    path = tmp_path / "suite.yaml"
    path.write_text(suite_text("fake", folder, SCENARIOS_VARIANTS))
    return path


def run_suite(path, results, runtime: FakeRuntime):
    runner = SuiteRunner(results, LocalExecutor(runtime), progress=False)
    return runner.run(load_suite(path))


def test_fake_suite_writes_helm_layout(suite_file, tmp_path):
    runtime = FakeRuntime()
    outcomes = run_suite(suite_file, tmp_path / "r", runtime)
    assert [o.status for o in outcomes] == ["done"] * 8
    for o in outcomes:
        folder = tmp_path / "r" / "fake" / o.run_id
        assert all((folder / f).is_file() for f in HELM_FILES + OUR_FILES), o.run_id
        assert json.loads((folder / "done.json").read_text())["key"] == json.loads(
            (folder / "flexhelm_run.json").read_text())["key"]
    lam = tmp_path / "r" / "fake" / "tiny--lambada--4bit--b3"
    states = json.loads((lam / "scenario_state.json").read_text())["request_states"]
    assert len(states) == 10 and {s["result"]["batch_size"] for s in states} == {3, 1}  # 10 = 3+3+3+1
    stats = {s["name"]["name"] for s in json.loads((lam / "stats.json").read_text())}
    assert "prompt_truncated" in stats  # scenario metrics ran (the tiny model's window truncates every passage)
    policy = json.loads((lam / "policy.json").read_text())
    assert policy["requested"] == "auto" and policy["policy"]["compress_weight"]["bits"] == 4
    assert policy["policy"]["compress_cache"] is None and policy["policy"]["gpu_batch_size"] == 3
    env = json.loads((lam / "env.json").read_text())
    assert env["packages"]["crfm-helm"] and env["hardware"]["cpu_count"] >= 1
    runtime_json = json.loads((lam / "runtime.json").read_text())
    assert runtime_json["engine_calls"] == 4 and runtime_json["requests"] == 10
    # a rerun of the same command skips every finished run and sends nothing
    again = FakeRuntime()
    assert [o.status for o in run_suite(suite_file, tmp_path / "r", again)] == ["skipped"] * 8
    assert again.processed == []


@pytest.mark.parametrize("crash_at", [0, 5, 23])
def test_crash_and_rerun_equal_an_uninterrupted_run(suite_file, tmp_path, crash_at):
    clean = FakeRuntime()
    run_suite(suite_file, tmp_path / "clean", clean)
    total = len(clean.processed)
    assert clean.batches > 23

    crashing = FakeRuntime(crash_at_batch=crash_at)
    with pytest.raises(InjectedCrash):
        run_suite(suite_file, tmp_path / "resumed", crashing)
    finished_before = len(crashing.processed)
    rerun = FakeRuntime()
    run_suite(suite_file, tmp_path / "resumed", rerun)

    # nothing finished before the crash is sent again, and everything else is sent exactly once
    assert len(rerun.processed) == total - finished_before
    assert not set(crashing.processed) & set(rerun.processed)
    for run_dir in sorted((tmp_path / "clean" / "fake").glob("tiny--*")):
        for name in SAME_FILES:
            resumed = tmp_path / "resumed" / "fake" / run_dir.name / name
            assert resumed.read_text() == (run_dir / name).read_text(), f"{run_dir.name}/{name}"


def test_edited_entry_reruns_and_reuses_the_cache(suite_file, tmp_path):
    run_suite(suite_file, tmp_path / "r", FakeRuntime())
    suite_file.write_text(suite_file.read_text().replace("max_instances: 10", "max_instances: 12"))
    rerun = FakeRuntime()
    outcomes = run_suite(suite_file, tmp_path / "r", rerun)
    assert [o.status for o in outcomes][:2] == ["done", "done"] and outcomes[2].status == "skipped"
    # the batches of 3 differ now ([0..2], [3..5], ...), but requests already answered come from the cache
    assert len(rerun.processed) < 2 * 12


def test_torn_cache_line_is_dropped(tmp_path, caplog):
    from helm.common.request import RequestResult

    cache = RequestCache(tmp_path / "requests.jsonl")
    ok = RequestResult(success=True, embedding=[], completions=[], cached=False)
    cache.add_batch([("a", ok)], [{"wall_s": 1.0}])
    assert cache.get("a") is ok  # answered at once; on disk after flush
    cache.flush()
    with open(tmp_path / "requests.jsonl", "ab") as f:
        f.write(b'{"calls": [], "results": {"b": {"succ')  # killed mid-write
    reopened = RequestCache(tmp_path / "requests.jsonl")
    assert reopened.get("a") == ok and reopened.get("b") is None
    assert "dropped a torn last line (37 bytes" in caplog.text
    reopened.add_batch([("c", ok)], [])
    reopened.flush()
    assert set(RequestCache(tmp_path / "requests.jsonl").results) == {"a", "c"}


def test_cache_write_errors_reach_the_run(tmp_path, monkeypatch):
    """A full disk in the cache's writer thread stops the run at the next batch (or at flush), named."""
    import errno
    import os

    from helm.common.request import RequestResult

    ok = RequestResult(success=True, embedding=[], completions=[], cached=False)
    cache = RequestCache(tmp_path / "requests.jsonl")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    cache.add_batch([("a", ok)], [])
    with pytest.raises(OSError, match="No space left"):
        cache.flush()
    cache.add_batch([("b", ok)], [])
    cache._writes[0].exception()  # wait for the failed write: the next batch reports it
    with pytest.raises(OSError, match="No space left"):
        cache.add_batch([("c", ok)], [])


def test_full_disk_while_writing_a_runs_files_fails_it_named_and_loses_nothing(suite_file, tmp_path, monkeypatch):
    """ENOSPC while a run writes its result files: that run fails with one line naming the folder and the bytes
    it needed, no partial file and no `done.json` is left, the request cache stays whole; with room again the
    same command finishes the suite without computing a request twice."""
    import errno
    from pathlib import Path

    run_suite(suite_file, tmp_path / "clean", FakeRuntime())
    real = Path.write_bytes

    def full_for_stats(self, data):
        if self.name.startswith(".stats.json."):
            real(self, data[:len(data) // 2])  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_for_stats)
    first = FakeRuntime()
    outcomes = run_suite(suite_file, tmp_path / "r", first)
    monkeypatch.undo()
    assert {o.status for o in outcomes} == {"failed"}
    run_dir = tmp_path / "r" / "fake" / "tiny--lambada--fp16--b3"
    assert f"no room to write in {run_dir} (No space left on device: needed " in outcomes[0].error
    assert "bytes free); free space there and run the same command again" in outcomes[0].error
    assert not list(run_dir.glob(".stats.json.*")) and not (run_dir / "stats.json").exists()
    assert not list((tmp_path / "r" / "fake").glob("*/done.json"))
    again = FakeRuntime()
    assert {o.status for o in run_suite(suite_file, tmp_path / "r", again)} == {"done"}
    assert again.processed == [] and _duplicate_keys(tmp_path / "r" / "fake") == []  # all from the caches
    _same_as(tmp_path / "clean" / "fake", tmp_path / "r" / "fake")


def test_failed_run_is_reported_and_others_go_on(suite_file, tmp_path):
    class Broken(FakeRuntime):
        def __call__(self, model_dir, policy):
            if policy.compress_weight is not None:
                raise RuntimeError("no 4-bit today")
            return super().__call__(model_dir, policy)

    outcomes = run_suite(suite_file, tmp_path / "r", Broken())
    status = {o.run_id: o.status for o in outcomes}
    assert status["tiny--lambada--4bit--b3"] == "failed" and status["tiny--lambada--fp16--b3"] == "done"
    assert "no 4-bit today" in (tmp_path / "r" / "fake" / "tiny--lambada--4bit--b3" / "run.log").read_text()
    assert not (tmp_path / "r" / "fake" / "tiny--lambada--4bit--b3" / "done.json").exists()


def test_fast_json_matches_helms_asdict(suite_file, tmp_path):
    """Our writer's `to_tree` gives exactly HELM's `asdict_without_nones` on a real scenario state."""
    import dacite
    from helm.benchmark.adaptation.scenario_state import ScenarioState
    from helm.common.general import asdict_without_nones

    from harness.helm_json import to_tree

    run_suite(suite_file, tmp_path / "r", FakeRuntime())
    path = tmp_path / "r" / "fake" / "tiny--wikitext--fp16--b3" / "scenario_state.json"
    state = dacite.from_dict(ScenarioState, json.loads(path.read_text()))
    assert to_tree(state) == json.loads(json.dumps(asdict_without_nones(state)))


KILLABLE = """\
import sys
from harness.executor import LocalExecutor
from harness.runner import SuiteRunner
from harness.suite import load_suite
from tests.harness.fake_runtime import FakeRuntime
SuiteRunner(sys.argv[2], LocalExecutor(FakeRuntime(delay_s=0.05)), progress=False).run(load_suite(sys.argv[1]))
"""


def test_kill_9_mid_run_then_rerun(suite_file, tmp_path):
    """A real SIGKILL while a run writes its request cache; the same command again completes the suite."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    clean = FakeRuntime()
    run_suite(suite_file, tmp_path / "clean", clean)
    killed = tmp_path / "killed"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(suite_file), str(killed)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = killed / "fake" / "tiny--wikitext--fp16--b3" / "requests.jsonl"
    deadline = time.monotonic() + 120
    while not (cache.is_file() and cache.read_bytes().count(b"\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cache.parent / "done.json").exists()
    cached = sum(len(RequestCache(p).results) for p in killed.glob("fake/*/requests.jsonl"))

    rerun = FakeRuntime()
    run_suite(suite_file, killed, rerun)
    assert len(rerun.processed) == len(clean.processed) - cached
    for run_dir in sorted((tmp_path / "clean" / "fake").glob("tiny--*")):
        for name in SAME_FILES:
            assert (killed / "fake" / run_dir.name / name).read_text() == (run_dir / name).read_text()


def test_a_suite_runs_on_a_llama_family_model(tmp_path, tokenizer_dir):
    """The real runtime under the runner (no fake): LAMBADA, WikiText and synthetic runs of a tiny Qwen2-shaped
    model (GQA, q/k/v biases, tied head), fp16 and 4-bit, in HELM's layout with their metrics."""
    from tests import tiny_models

    folder = tmp_path / "model"  # 512 positions: LAMBADA's passages fit, so they are scored
    tiny_models.build_llama(folder, "qwen2-bias", max_position_embeddings=512, tokenizer=tokenizer_dir)
    path = tmp_path / "suite.yaml"
    # its own model name: HELM's registry is per process, and `tiny` is the OPT model of the other tests
    path.write_text(suite_text("llama", folder, SCENARIOS_VARIANTS).replace("name: tiny\n", "name: qwen2-tiny\n"))
    outcomes = SuiteRunner(tmp_path / "r", progress=False).run(load_suite(path))
    assert [o.status for o in outcomes] == ["done"] * 8, [o.error for o in outcomes]
    means = {}
    for run in outcomes:
        run_dir = tmp_path / "r" / "llama" / run.run_id
        assert all((run_dir / f).is_file() for f in HELM_FILES + OUR_FILES), run_dir
        means[run.run_id] = {s["name"]["name"]: s.get("mean") for s in json.loads((run_dir / "stats.json").read_text())
                             if s["name"].get("split") == "test" and not s["name"].get("perturbation")}
    for variant in ("fp16", "4bit"):
        assert means[f"qwen2-tiny--lambada--{variant}--b3"]["prompt_truncated"] == 0.0
        assert 0.0 <= means[f"qwen2-tiny--lambada--{variant}--b3"]["lambada_accuracy"] <= 1.0
        assert means[f"qwen2-tiny--synthetic--{variant}--b4"]["num_output_tokens"] == 4
    ppl = [means[f"qwen2-tiny--wikitext--{v}--b3"]["perplexity"] for v in ("fp16", "4bit")]
    assert 1 < ppl[0] < 10 * 300 and ppl[1] != ppl[0] and abs(ppl[1] / ppl[0] - 1) < 0.2  # 4-bit: close, not equal


def _same_as(clean_dir, other_dir) -> None:
    for run_dir in sorted(clean_dir.glob("tiny--*")):
        for name in SAME_FILES:
            assert (other_dir / run_dir.name / name).read_text() == (run_dir / name).read_text(), run_dir.name


def _duplicate_keys(suite_dir) -> list[str]:
    """Request keys written more than once into a run's cache (a request computed twice)."""
    dupes = []
    for path in suite_dir.glob("*/requests.jsonl"):
        seen: set[str] = set()
        for line in path.read_text().splitlines():
            keys = set(json.loads(line)["results"])
            dupes += sorted(seen & keys)
            seen |= keys
    return dupes


def test_a_run_held_by_another_runner_is_left_to_it(suite_file, tmp_path):
    """A run folder whose lock another runner holds is not touched; once free, the same command finishes it."""
    from harness.run_lock import try_lock

    clean = FakeRuntime()
    run_suite(suite_file, tmp_path / "clean", clean)
    held = tmp_path / "r" / "fake" / "tiny--wikitext--4bit--b3"
    lock = try_lock(held)  # flock is per open file: a second open in this process is refused as another's
    assert lock is not None and try_lock(held) is None
    first = run_suite(suite_file, tmp_path / "r", FakeRuntime())
    busy = [o for o in first if o.status == "busy"]
    assert [o.run_id for o in busy] == [held.name] and f"pid {os.getpid()}" in busy[0].error
    assert sum(o.status == "done" for o in first) == 7 and not (held / "requests.jsonl").exists()
    lock.release()
    second = FakeRuntime()
    assert [o.status for o in run_suite(suite_file, tmp_path / "r", second)].count("done") == 1
    clean_state = tmp_path / "clean" / "fake" / held.name / "scenario_state.json"
    assert len(second.processed) == len(json.loads(clean_state.read_text())["request_states"])  # that run alone
    _same_as(tmp_path / "clean" / "fake", tmp_path / "r" / "fake")


CONCURRENT = """\
import sys
from harness.executor import LocalExecutor
from harness.runner import SuiteRunner
from harness.suite import load_suite
from tests.harness.fake_runtime import FakeRuntime
out = SuiteRunner(sys.argv[2], LocalExecutor(FakeRuntime(delay_s=0.02)), progress=False).run(load_suite(sys.argv[1]))
print(" ".join(o.status for o in out))
"""


def test_two_runners_of_one_suite_at_once(suite_file, tmp_path):
    """Two `flexhelm run` of the same suite into the same folder at once: no run is written by both, no request
    is computed twice into a cache; between them (and a rerun for what each left to the other) the suite ends
    as an uninterrupted run does."""
    import subprocess
    import sys
    from pathlib import Path

    run_suite(suite_file, tmp_path / "clean", FakeRuntime())
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(suite_file), str(tmp_path / "r")], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    statuses = [out.splitlines()[-1].split() for out, _ in outs]
    assert all(len(s) == 8 and "failed" not in s for s in statuses), outs
    assert _duplicate_keys(tmp_path / "r" / "fake") == []
    rerun = FakeRuntime()
    run_suite(suite_file, tmp_path / "r", rerun)  # picks up what each left to the other while it ran
    assert _duplicate_keys(tmp_path / "r" / "fake") == []
    _same_as(tmp_path / "clean" / "fake", tmp_path / "r" / "fake")


SIGTERMED = """\
import sys
import harness.runner as runner
from harness.executor import LocalExecutor
from tests.harness.fake_runtime import FakeRuntime
init = runner.SuiteRunner.__init__
runner.SuiteRunner.__init__ = lambda self, results, executor=None, progress=None: init(
    self, results, LocalExecutor(FakeRuntime(delay_s=0.05)), False)
from harness.cli import main
sys.exit(main(["run", sys.argv[1], "--results", sys.argv[2]]))
"""


def test_sigterm_stops_the_suite_keeps_its_work_and_says_how_to_resume(suite_file, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_suite(suite_file, tmp_path / "clean", FakeRuntime())
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", SIGTERMED, str(suite_file), str(tmp_path / "r")], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "r" / "fake" / "tiny--wikitext--fp16--b3" / "requests.jsonl"
    deadline = time.monotonic() + 120
    while not (cache.is_file() and cache.read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "the suite ended before SIGTERM"
        time.sleep(0.01)
    lines = (tmp_path / "r" / "fake" / "tiny--lambada--fp16--b3" / "requests.jsonl").read_bytes().count(b"\n")
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - sent < 10
    assert f"Resume with: flexhelm run {suite_file} --results {tmp_path / 'r'}" in err
    assert "Traceback" not in err
    done = {p.parent.name for p in (tmp_path / "r" / "fake").glob("*/done.json")}
    assert "tiny--lambada--fp16--b3" in done and len(done) < 8 and lines == 4  # finished work kept
    rerun = FakeRuntime()
    run_suite(suite_file, tmp_path / "r", rerun)
    assert _duplicate_keys(tmp_path / "r" / "fake") == []
    _same_as(tmp_path / "clean" / "fake", tmp_path / "r" / "fake")


def test_a_suite_holds_one_model_at_a_time_and_leaves_no_threads_or_files(tmp_path, tiny_opt, monkeypatch):
    """A long suite must not grow: the real backend of each run replaces the last one (closed: its I/O threads,
    scratch files and weights go), and after the suite the threads and open files are those before it."""
    import gc
    import threading
    import weakref

    from harness.backend import RuntimeBackend

    folder, _ = tiny_opt()
    monkeypatch.setenv("FLEXHELM_CACHE", str(tmp_path / "cache"))
    variants = "".join(f"""\
  - name: {name}
    compress: {compress}
    policy: {{weights: {{device: 0.5, host: 0.0}}}}
    batch_sizes: [2]
""" for name, compress in (("fp16", "off"), ("w4", "weights"), ("c4", "cache")))
    text = suite_text("long", folder, f"""\
scenarios:
  - run: synthetic:num_prompts=4,prompt_len=8,output_len=2
    name: synthetic
  - run: lambada:method=greedy
    name: lambada
    max_instances: 2
variants:
{variants}""")
    path = tmp_path / "long.yaml"
    path.write_text(text)
    alive_at_load: list[int] = []
    backends: list[weakref.ref] = []
    init = RuntimeBackend.__init__

    def counting(self, *args, **kwargs):
        alive_at_load.append(sum(r() is not None for r in backends))
        init(self, *args, **kwargs)
        backends.append(weakref.ref(self))

    monkeypatch.setattr(RuntimeBackend, "__init__", counting)

    def suite(results) -> list[str]:
        return [o.status for o in SuiteRunner(results, LocalExecutor(), progress=False).run(load_suite(path))]

    assert suite(tmp_path / "warm") == ["done"] * 6  # HELM's and torch's own threads start here, once
    gc.collect()
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    assert suite(tmp_path / "r") == ["done"] * 6
    gc.collect()
    assert len(alive_at_load) == 12 and set(alive_at_load) == {0}  # each run's model replaced the last one
    assert all(r() is None for r in backends)  # and the suite's end let the last one go
    assert threading.active_count() == threads and len(os.listdir("/proc/self/fd")) == fds


@pytest.mark.slow
def test_a_hundred_runs_keep_rss_flat(tmp_path, tiny_opt, monkeypatch, capsys):
    """Issue 20's long-suite figure: 108 short real runs (9 scenarios x 4 variants x 3 batch sizes on the tiny
    model); the RSS before run 100 is within 10% of the RSS before run 10, threads and open files do not grow.
    `pytest -m slow -k hundred -s` prints the figures."""
    import threading

    folder, _ = tiny_opt()
    monkeypatch.setenv("FLEXHELM_CACHE", str(tmp_path / "cache"))
    scenarios = "".join(f"""\
  - run: synthetic:num_prompts=4,prompt_len={n},output_len=3
    name: synthetic-{n}
""" for n in (4, 6, 8, 10, 12, 14, 16)) + """\
  - run: lambada:method=greedy
    name: lambada
    max_instances: 3
  - run: wikitext
    max_instances: 1
"""
    variants = "".join(f"""\
  - name: {name}
    compress: {compress}
    batch_sizes: [1, 2, 4]
""" for name, compress in (("fp16", "off"), ("w4", "weights"), ("c4", "cache"), ("w4c4", "both")))
    path = tmp_path / "long.yaml"
    path.write_text(suite_text("long", folder, f"scenarios:\n{scenarios}variants:\n{variants}"))
    samples: list[tuple[int, int, int]] = []  # before each run: RSS bytes, threads, open files

    class Sampling(LocalExecutor):
        def execute(self, job, states, cache, on_batch):
            rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
            samples.append((rss, threading.active_count(), len(os.listdir("/proc/self/fd"))))
            return super().execute(job, states, cache, on_batch)

    outcomes = SuiteRunner(tmp_path / "r", Sampling(), progress=False).run(load_suite(path))
    assert [o.status for o in outcomes] == ["done"] * 108
    (rss10, threads10, fds10), (rss100, threads100, fds100) = samples[9], samples[99]
    with capsys.disabled():
        print(f"\nRSS before run 10: {rss10 / 2**20:.1f} MiB, before run 100: {rss100 / 2**20:.1f} MiB "
              f"({rss100 / rss10 - 1:+.1%}); threads {threads10} -> {threads100}; open files {fds10} -> {fds100}")
    assert rss100 <= 1.1 * rss10 and threads100 <= threads10 and fds100 <= fds10
