"""Out of memory: a run's peak RAM on disk while it computes (`harness/suites/memory_watch.py`), and the next attempt
planned below it after a kill (`harness/planning/policies.py run_policy`). The real SIGKILL mid-suite is in
test_reliability.py (`test_kill_9_mid_run_then_rerun`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from harness.suites.suite import load_suite


def test_memory_record_follows_the_peak_and_says_how_the_attempt_ended(tmp_path):
    """While a run computes, memory.json holds its peak RSS with `running`; an orderly end says `ended`. The
    record a SIGKILL leaves (`running`) is what the next attempt plans below."""
    import time

    from harness.suites import memory_watch

    with memory_watch.MemoryWatch(tmp_path, attempt=3):
        before = memory_watch.last_attempt(tmp_path)
        block = bytearray(256 * 2**20)  # touched: resident
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(4 * memory_watch.INTERVAL_S)
        during = memory_watch.last_attempt(tmp_path)
        del block
    after = memory_watch.last_attempt(tmp_path)
    assert before["state"] == during["state"] == "running" and after["state"] == "ended"
    assert during["peak_rss"] >= before["peak_rss"] + 200 * 2**20 and after["attempt"] == 3
    assert memory_watch.replan_budget(after) is None
    assert memory_watch.replan_budget(during) == int(0.8 * during["peak_rss"])


def test_a_killed_run_is_planned_again_below_the_peak_it_reached(tmp_path, tiny_opt, monkeypatch, caplog):
    """The OOM killer's SIGKILL leaves memory.json saying `running`: the next attempt plans `auto` again for at
    most 0.8 of that peak (more of the model on disk), records why in policy.json, and keeps the request cache's
    keys (placement is not part of them); an explicit policy runs again as it is, with a warning."""
    from harness.planning.policies import run_policy
    from harness.suites import atomic
    from harness.suites.request_cache import request_key
    from runtime.errors import PolicyError
    from tests.harness.test_suite import GOOD, write
    from tests.runtime.cost_fixtures import cpu_hardware

    folder, model = tiny_opt()
    hw = cpu_hardware(base_mem=2**20)
    monkeypatch.setenv("FLEXHELM_HARDWARE", str(hw.save(tmp_path / "cpu.json")))
    monkeypatch.setenv("FLEXHELM_DEFAULT_POLICY", "auto")
    suite = load_suite(write(tmp_path, GOOD, model=folder))
    auto_run, explicit_run = suite.runs[0], suite.runs[1]
    assert auto_run.variant.policy == "auto" and explicit_run.variant.policy != "auto"
    run_dir = tmp_path / "run"
    first = run_policy(auto_run, run_dir, [])
    assert first.policy.weights.disk == 0.0 and run_policy(auto_run, run_dir, []).policy == first.policy
    peak = int(first.prediction["memory"]["device"])  # the dead attempt reached its planned RAM and was killed there
    atomic.write_json(run_dir / "memory.json", {"state": "running", "peak_rss": peak, "attempt": 1})
    again = run_policy(auto_run, run_dir, [])
    assert again.policy.weights.disk > 0.0 and again.prediction["memory"]["device"] <= int(0.8 * peak)
    saved = json.loads((run_dir / "policy.json").read_text())
    assert saved["replanned"] == {"after_peak_rss": peak, "ram_limit": int(0.8 * peak), "attempt": 2}
    assert "planned again for at most" in caplog.text
    atomic.write_json(run_dir / "memory.json", {"state": "running", "peak_rss": peak, "attempt": 2})
    with pytest.raises(PolicyError, match="no policy fits"):  # killed again: below the last limit, which no plan fits
        run_policy(auto_run, run_dir, [])
    key = lambda p: request_key({"folder": "m"}, p.to_json(), SimpleRequest("x"))  # noqa: E731
    assert key(first.policy) == key(again.policy)
    # int8 compute changes results, so it changes the key; `exact` keys what it keyed before the field existed
    assert key(dataclasses.replace(first.policy, compute="int8")) != key(first.policy)
    old = {k: v for k, v in first.policy.to_json().items() if k != "compute"}
    assert request_key({"folder": "m"}, old, SimpleRequest("x")) == key(first.policy)

    explicit_dir = tmp_path / "explicit"
    fixed = run_policy(explicit_run, explicit_dir, [])
    atomic.write_json(explicit_dir / "memory.json", {"state": "running", "peak_rss": peak, "attempt": 1})
    assert run_policy(explicit_run, explicit_dir, []).policy == fixed.policy
    assert "its policy is explicit" in caplog.text


@dataclasses.dataclass(frozen=True)
class SimpleRequest:
    """Stands for a HELM Request in a cache key (a dataclass, as HELM's is)."""

    prompt: str
