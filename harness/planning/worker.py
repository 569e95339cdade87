"""An engine in a child process: its memory, disk reads and page cache can be measured and bounded alone.

The child is spawned (a fresh interpreter: no torch threads or allocator state inherited from the
parent) and serves calls `fn(state, *args)`, where `fn` is a module-level function (pickled by name)
and `state` a dict that lives as long as the child, e.g. to hold a loaded model between calls. The child
imports `preload` as soon as it starts, so workers started together import torch side by side.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any


class WorkerError(RuntimeError):
    """A call failed in the worker, or the worker died (e.g. killed by its cgroup's OOM killer)."""


class Worker:
    def __init__(self, name: str, preload: str | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, preload), name=f"bench-{name}", daemon=True)
        self.proc.start()
        child.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            self._conn.send((fn, args))
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise WorkerError(f"the {self.name} worker died (exit code {self.proc.exitcode}; -9 is SIGKILL, "
                              "e.g. the out-of-memory killer of its memory cgroup)") from None
        if not ok:
            raise WorkerError(f"{fn.__name__} failed in the {self.name} worker:\n{value}")
        return value

    def close(self) -> None:
        """Stop the child and wait for it (its CPU time then counts in `os.times().children_*`)."""
        try:
            self._conn.send(None)
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self._conn.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(conn, preload: str | None) -> None:
    if preload:
        importlib.import_module(preload)
    state: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            return
        if msg is None:
            return
        fn, args = msg
        try:
            conn.send((True, fn(state, *args)))
        except Exception:
            conn.send((False, traceback.format_exc()))
