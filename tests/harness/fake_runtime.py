"""A fake runtime backend for harness tests: deterministic results in microseconds, and a crash on demand.

It has `RuntimeBackend.process_batch`'s contract (HELM requests in, `BatchOutput` out) without the engine:
an echo request gets its prompt's tokens back at fixed log-probs, a generation request the first
`max_tokens` tokens of its own prompt. Timings and memory are constants, so two runs write identical files.
"""

from __future__ import annotations

import dataclasses
import json
import time

from harness.helm.backend import BatchOutput, EngineCall, _output
from harness.helm.token_text import TokenTexts
from runtime.results import CallStats


class InjectedCrash(BaseException):
    """Stands for kill -9: not an `Exception`, so nothing in the harness catches it."""


class FakeRuntime:
    """`backend_factory` for `LocalExecutor`: every backend it makes shares its counters."""

    def __init__(self, crash_at_batch: int | None = None, delay_s: float = 0.0, error_at_batch: int | None = None,
                 rendezvous: tuple[str, int] | None = None, record: str | None = None) -> None:
        self.crash_at_batch = crash_at_batch
        """Raise `InjectedCrash` when this batch (0-based, counted over all backends) starts."""
        self.delay_s = delay_s
        """Sleep this long per batch (gives a test time to kill the process mid-run)."""
        self.error_at_batch = error_at_batch
        """Raise a `ValueError` (an ordinary error, as a bad input makes) when this batch starts."""
        self.rendezvous = rendezvous
        """(folder, n): before its first batch, wait (up to 60 s) until n copies of this runtime, in any processes,
        have reached their first batch: proof that n runs are in flight at once."""
        self.record = record
        """A file to which every processed request is appended (`recorded` reads it): what was computed, also by
        copies of this runtime in other processes (Ray's workers)."""
        self.batches = 0
        self.processed: list[tuple[str, str]] = []
        """(policy, request), both as JSON, of every request processed, in order."""
        self._tokenizers: dict = {}

    def __call__(self, model_dir, policy):
        from runtime.checkpoint import load_tokenizer

        if model_dir not in self._tokenizers:
            self._tokenizers[model_dir] = load_tokenizer(model_dir)
        return _FakeBackend(self, self._tokenizers[model_dir], json.dumps(policy.to_json(), sort_keys=True))


class _FakeBackend:
    def __init__(self, runtime: FakeRuntime, tokenizer, policy: str) -> None:
        self.runtime, self.tokenizer, self.texts, self.policy = runtime, tokenizer, TokenTexts(tokenizer), policy

    def process_batch(self, requests) -> BatchOutput:
        from helm.common.request import RequestResult

        rt = self.runtime
        if rt.crash_at_batch is not None and rt.batches == rt.crash_at_batch:
            raise InjectedCrash(f"crash injected at batch {rt.batches}")
        if rt.error_at_batch is not None and rt.batches == rt.error_at_batch:
            raise ValueError(f"bad input injected at batch {rt.batches}")
        if rt.rendezvous is not None and rt.batches == 0:
            _meet(*rt.rendezvous)
        rt.batches += 1
        time.sleep(rt.delay_s)
        rt.processed.extend((self.policy, json.dumps(dataclasses.asdict(r), sort_keys=True)) for r in requests)
        if rt.record is not None:
            import os

            with open(rt.record, "a") as f:
                f.write("".join(json.dumps({"pid": os.getpid(), "policy": self.policy, "prompt": r.prompt}) + "\n"
                                for r in requests))
        results, prompt_tokens, generated = [], 0, 0
        for r in requests:
            ids = self.tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
            prompt_tokens += len(ids)
            out_ids = ids if r.echo_prompt else ids[:r.max_tokens]
            generated += 0 if r.echo_prompt else len(out_ids)
            logprobs = [-1.0 - (i % 7) / 10 for i in out_ids]
            completion = _output(self.texts.render(out_ids), logprobs, "length")
            results.append(RequestResult(success=True, embedding=[], completions=[completion] * r.num_completions,
                                         cached=False, request_time=0.01, batch_size=len(requests),
                                         batch_request_time=0.01))
        stats = CallStats(prefill_s=0.004, decode_s=0.006, prompt_tokens=prompt_tokens, generated_tokens=generated,
                          peak_memory={"host": 2**20, "disk": 0})
        return BatchOutput(results, [EngineCall("fake", len(requests), len(requests), 0.01, stats)])


def recorded(path) -> list[dict]:
    """The requests a runtime with `record=path` processed: `{"pid", "policy", "prompt"}` each, in order."""
    from pathlib import Path

    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def _meet(folder: str, parties: int) -> None:
    import os
    import uuid
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    deadline = time.monotonic() + 60
    while len(list(Path(folder).iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{parties} runs never were in flight at once")
        time.sleep(0.02)


def suite_text(name: str, model, rest: str) -> str:
    """A suite file on one model named `tiny` at `model`: lines 1-4, then `rest` (scenarios, variants)."""
    return f"suite: {name}\nmodels:\n  - name: tiny\n    path: {model}\n" + rest


SAME_FILES = ("scenario_state.json", "stats.json", "per_instance_stats.json", "runtime.json", "policy.json",
              "run_spec.json")
"""Run files that two runs of one suite write identically (timings and memory of the fake are constants)."""
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


def run_suite(path, results, runtime: FakeRuntime):
    """The outcomes of running the suite file at `path` into `results` on `runtime`."""
    from harness.suites.executor import LocalExecutor
    from harness.suites.runner import SuiteRunner
    from harness.suites.suite import load_suite

    runner = SuiteRunner(results, LocalExecutor(runtime), progress=False)
    return runner.run(load_suite(path))


def same_as(clean_dir, other_dir) -> None:
    """Every run folder of `clean_dir` has the same `SAME_FILES` in `other_dir`."""
    for run_dir in sorted(clean_dir.glob("tiny--*")):
        for name in SAME_FILES:
            ours, clean = (other_dir / run_dir.name / name).read_text(), (run_dir / name).read_text()
            assert ours == clean, f"{run_dir.name}/{name}"


def duplicate_keys(suite_dir) -> list[str]:
    """Request keys written more than once into a run's cache (a request computed twice)."""
    dupes = []
    for path in suite_dir.glob("*/requests.jsonl"):
        seen: set[str] = set()
        for line in path.read_text().splitlines():
            keys = set(json.loads(line)["results"])
            dupes += sorted(seen & keys)
            seen |= keys
    return dupes
