"""Progress of a suite: one bar for the suite (runs, ETA; with the Ray executor, the runs in flight on each node)
and one for the current run (requests, instances, tokens/s, ETA). On a terminal they redraw in place; elsewhere
(a log, CI) only one line per finished run."""

from __future__ import annotations

import sys
import time

from harness.suites.executor import BatchDone


class SuiteProgress:
    def __init__(self, total_runs: int, enabled: bool | None = None) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.suite_bar = tqdm(total=total_runs, unit="run", desc="suite", position=0, disable=not self.enabled,
                              dynamic_ncols=True)
        self.run_bar = None
        self._started = 0.0
        self._tokens = 0
        self._instances = (0, 0)

    def start_run(self, run_id: str, num_requests: int, num_instances: int) -> None:
        self.run_bar = self._tqdm(total=num_requests, unit="req", desc=run_id, position=1, leave=False,
                                  disable=not self.enabled, dynamic_ncols=True)
        self._started, self._tokens = time.perf_counter(), 0
        self._instances = (0, num_instances)
        self._per_request = num_instances / max(num_requests, 1)

    def batch_done(self, done: BatchDone) -> None:
        if self.run_bar is None:
            return
        if not done.cached:
            self._tokens += done.prompt_tokens + done.generated_tokens
        elapsed = time.perf_counter() - self._started
        self.run_bar.update(done.requests)
        # instances: requests map to instances evenly enough for a progress figure (LM windows vary)
        finished = min(round(self.run_bar.n * self._per_request), self._instances[1])
        self.run_bar.set_postfix_str(f"inst {finished}/{self._instances[1]}, "
                                     f"{self._tokens / elapsed if elapsed > 0 else 0:.0f} tok/s", refresh=False)

    def executed(self) -> None:
        """The run's requests are done (its metrics and files may still be in progress)."""
        if self.run_bar is not None:
            self.run_bar.close()
            self.run_bar = None

    def in_flight(self, text: str) -> None:
        """What runs where now (the Ray executor: runs in flight per node), beside the suite's bar."""
        self.suite_bar.set_postfix_str(text, refresh=True)

    def end_run(self, line: str) -> None:
        self.executed()
        self.suite_bar.update(1)
        self.write(line)

    def write(self, line: str) -> None:
        self._tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        self.suite_bar.close()
