"""A run's request cache: finished batches survive a crash, and a rerun reuses them instead of recomputing.

One append-only JSON Lines file per run; each line is one finished batch:
`{"calls": [EngineCall json, ...], "results": {key: RequestResult json, ...}}`, written in one `write` and
fsync'ed, so a line is either whole or the torn tail of a crash. A torn tail is cut off when the file is
reopened (appending after it would glue the next batch to garbage). Lines are serialised and written by a
writer thread while the runtime computes the next batch (benchmark W5): a kill loses at most the batches
still queued there (usually none, at most the one being written); `flush` waits for them and raises what
the writer met (a full disk), and the runner flushes before it writes a run's files.

A result's key hashes the model's identity (folder, config, weight files' sizes and times), the runtime
policy (the variant, batch included) and the HELM request itself, so a cache can never answer a request
that would now run differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from harness.helm.json_io import result_from_json, to_tree
from runtime.errors import disk_full

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def model_identity(folder: str | os.PathLike) -> dict:
    """What identifies a checkpoint's results: its folder and its files' names, sizes and modification times
    (cheap: weights are not hashed; any rewrite changes the time)."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return {"folder": str(folder), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def whole_lines(data: bytes) -> bytes:
    """A cache file's bytes without a torn last line (the write a crash or kill cut short; its batch is computed
    again)."""
    return data[:data.rfind(b"\n") + 1]


RESULT_FIELDS = ("compress_weight", "compress_cache", "device")
"""The Policy fields that change a request's result, besides `compute` (counted where it is not `exact`, so keys
from before it stay valid). Placement over tiers, the weight format, overlap and the split of a block into
micro-batches do not (offloading never changes results: tests/runtime check it), so a run replanned after it was
killed (`harness/suites/memory_watch.py`) keeps its finished batches."""


def request_key(model: dict, policy: dict, request) -> str:
    """Cache key of a HELM `Request` sent to `model` (see `model_identity`) under `policy` (Policy JSON; only its
    `RESULT_FIELDS` and `compute` count)."""
    fields = {k: policy.get(k) for k in RESULT_FIELDS}
    if policy.get("compute", "exact") != "exact":
        fields["compute"] = policy["compute"]
    payload = {"model": model, "policy": fields, "request": dataclasses.asdict(request)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class RequestCache:
    """Results of finished batches of one run, loaded from and appended to `path`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.results: dict[str, dict] = {}
        """Key -> `RequestResult` as JSON."""
        self.batches: list[tuple[frozenset[str], list[dict]]] = []
        """Each finished batch: its keys and engine calls (timings and memory of what produced the results)."""
        self._fresh: dict[str, object] = {}
        """Key -> `RequestResult` added by this process (its JSON may still be in the writer's queue)."""
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        whole = whole_lines(data)
        for line in whole.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # only possible for a line torn and then appended to by old code
                continue
            self._remember(record)
        if len(whole) < len(data):
            logging.getLogger("flexhelm").warning(
                f"{self.path}: dropped a torn last line ({len(data) - len(whole)} bytes, a write cut short by a "
                "kill); its batch is computed again")
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
                os.fsync(f.fileno())

    def get(self, key: str):
        """The cached `RequestResult` for `key`, or None."""
        if key in self._fresh:
            return self._fresh[key]
        found = self.results.get(key)
        return None if found is None else result_from_json(found)

    def add_batch(self, keyed_results: list[tuple[str, object]], calls: list[dict]) -> None:
        """Record a finished batch; durable once the writer has fsync'ed it (`flush` waits for that)."""
        self._raise_failed()
        self._fresh.update(keyed_results)
        self.batches.append((frozenset(k for k, _ in keyed_results), calls))
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="flexhelm-cache")
        self._writes.append(self._writer.submit(self._write, list(keyed_results), calls))

    def flush(self) -> None:
        """Wait until every added batch is on disk; raises the writer's error (e.g. a full disk)."""
        writes, self._writes = self._writes, []
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        for f in writes:
            f.result()

    def _raise_failed(self) -> None:
        """A write that failed stops the run at the next batch rather than at its end."""
        pending = []
        for f in self._writes:
            if f.done():
                f.result()
            else:
                pending.append(f)
        self._writes = pending

    def _write(self, keyed_results: list[tuple[str, object]], calls: list[dict]) -> None:
        record = {"calls": calls, "results": {k: to_tree(r) for k, r in keyed_results}}
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:  # a regular file takes it all at once, unless a signal interrupts the write
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:  # a part written before a full disk is a torn tail: dropped on the next load
            raise disk_full(e, self.path.parent, len(line)) or e from None

    def _remember(self, record: dict) -> None:
        self.results.update(record["results"])
        self.batches.append((frozenset(record["results"]), record["calls"]))

    def calls_for(self, keys: set[str]) -> list[dict]:
        """Engine calls of the batches that produced any of `keys` (a run's share of a cache it may share with
        an earlier, differently sized version of itself)."""
        return [c for batch_keys, calls in self.batches if batch_keys & keys for c in calls]
