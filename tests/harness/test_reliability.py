"""What an overnight suite survives: kill -9, torn cache lines, a full disk, SIGTERM, two runners of one suite at
once, and a hundred runs in one process (README "What survives what")."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("helm")

from harness.suites.executor import LocalExecutor  # noqa: E402
from harness.suites.request_cache import RequestCache  # noqa: E402
from harness.suites.runner import SuiteRunner  # noqa: E402
from harness.suites.suite import load_suite  # noqa: E402
from tests.harness.fake_runtime import (  # noqa: E402
    SAME_FILES,
    FakeRuntime,
    duplicate_keys,
    run_suite,
    same_as,
    suite_text,
)

pytestmark = pytest.mark.usefixtures("nltk_in_tmp")


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
    assert again.processed == [] and duplicate_keys(tmp_path / "r" / "fake") == []  # all from the caches
    same_as(tmp_path / "clean" / "fake", tmp_path / "r" / "fake")


KILLABLE = """\
import sys
from harness.suites.executor import LocalExecutor
from harness.suites.runner import SuiteRunner
from harness.suites.suite import load_suite
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
            ours, theirs = (killed / "fake" / run_dir.name / name).read_text(), (run_dir / name).read_text()
            if name == "policy.json" and run_dir.name == cache.parent.name:
                # the killed run says it was planned again below the RAM its dead attempt reached
                ours = json.loads(ours)
                again = ours.pop("replanned")
                assert again["after_peak_rss"] > 0 and again["ram_limit"] == int(0.8 * again["after_peak_rss"])
                assert again["attempt"] == 2 and ours == json.loads(theirs)
                continue
            assert ours == theirs, f"{run_dir.name}/{name}"
    assert json.loads((cache.parent / "memory.json").read_text())["state"] == "ended"


def test_a_run_held_by_another_runner_is_left_to_it(suite_file, tmp_path):
    """A run folder whose lock another runner holds is not touched; once free, the same command finishes it."""
    from harness.suites.run_lock import try_lock

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
    same_as(tmp_path / "clean" / "fake", tmp_path / "r" / "fake")


CONCURRENT = """\
import sys
from harness.suites.executor import LocalExecutor
from harness.suites.runner import SuiteRunner
from harness.suites.suite import load_suite
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
    assert duplicate_keys(tmp_path / "r" / "fake") == []
    rerun = FakeRuntime()
    run_suite(suite_file, tmp_path / "r", rerun)  # picks up what each left to the other while it ran
    assert duplicate_keys(tmp_path / "r" / "fake") == []
    same_as(tmp_path / "clean" / "fake", tmp_path / "r" / "fake")


SIGTERMED = """\
import sys
import harness.suites.runner as runner
from harness.suites.executor import LocalExecutor
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
    assert duplicate_keys(tmp_path / "r" / "fake") == []
    same_as(tmp_path / "clean" / "fake", tmp_path / "r" / "fake")


SLOW_FINISH = SIGTERMED.replace("from harness.cli import main", """import time
finish = runner.SuiteRunner._finish
def slow(self, *args):
    open(sys.argv[2] + ".finishing", "w").close()
    time.sleep(60)  # metrics of a huge run
    return finish(self, *args)
runner.SuiteRunner._finish = slow
from harness.cli import main""")


def test_a_second_sigterm_stops_at_once_while_a_run_finishes(suite_file, tmp_path):
    """The first SIGTERM waits for a finishing run's metrics; a second one ends the process at once, and the
    rerun completes the suite as if nothing happened."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_suite(suite_file, tmp_path / "clean", FakeRuntime())
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FINISH, str(suite_file), str(tmp_path / "r")], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    finishing = tmp_path / "r.finishing"
    deadline = time.monotonic() + 120
    while not finishing.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no run reached its metrics"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert proc.poll() is None  # waiting for the finishing run
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - sent < 5 and "stopped at once" in err
    assert not list((tmp_path / "r" / "fake").glob("*/done.json"))
    rerun = FakeRuntime()
    run_suite(suite_file, tmp_path / "r", rerun)
    assert duplicate_keys(tmp_path / "r" / "fake") == []
    same_as(tmp_path / "clean" / "fake", tmp_path / "r" / "fake")


def test_a_suite_holds_one_model_at_a_time_and_leaves_no_threads_or_files(tmp_path, tiny_opt, monkeypatch):
    """A long suite must not grow: the real backend of each run replaces the last one (closed: its I/O threads,
    scratch files and weights go), and after the suite the threads and open files are those before it."""
    import gc
    import threading
    import weakref

    from harness.helm.backend import RuntimeBackend

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
