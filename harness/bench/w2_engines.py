"""W2's two engines as they run inside their worker processes (harness/planning/worker.py): each `load_*` builds an
engine into the worker's `state`, `run` times one greedy generate of exactly `n` tokens and returns
(Row, generated ids, extra measurements for `w2.OffloadRow`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from harness.bench import w1
from harness.bench.measure import Row


def load_ours(state: dict, path: Path, policy, offload_dir: str, prompts: w1.Ids, budget: int) -> dict[str, int]:
    from runtime import Engine

    if "engine" in state:
        state.pop("engine").close()
    engine = Engine(path, policy, offload_dir=offload_dir)
    if engine.weights.nbytes > budget:
        raise RuntimeError(f"ours keeps {engine.weights.nbytes} bytes of weights in RAM, over the {budget} budget")
    state.update(engine=engine, prompts=prompts, run=_run_ours)
    return engine.weights.bytes_by_tier()


def _run_ours(state: dict, rep: int, n: int):
    engine = state["engine"]
    asked, fetch, wait = engine.runner.io.bytes_read, engine.weights.fetch_s, engine.weights.wait_s
    row, ids, peaks = w1.ours_generate(engine, state["prompts"], n, rep)
    # the weight store's own clocks: seconds in fetching weights and, of those, blocked on disk reads
    return row, ids, {"peak_rss": peaks["host"], "requested": engine.runner.io.bytes_read - asked,
                      "io_wait_s": engine.weights.wait_s - wait, "fetch_s": engine.weights.fetch_s - fetch}


def load_accelerate(state: dict, path: Path, budget: int, offload_dir: Path, prompts: w1.Ids) -> dict[str, int]:
    device_map, resident, on_disk = accelerate_device_map(path, budget)
    model = w1.load_hf(path, device_map=device_map, offload_folder=str(offload_dir))
    state.update(model=model, ids=torch.tensor(prompts), disk_per_forward=on_disk, run=_run_accelerate)
    return {"cpu": resident, "disk": on_disk}


def _run_accelerate(state: dict, rep: int, n: int):
    from transformers import StoppingCriteriaList

    from runtime.device import PeakMemory

    memory = PeakMemory(torch.device("cpu"))
    first = _FirstToken()
    memory.reset()
    t0 = time.perf_counter()
    out = w1.hf_generate(state["model"], state["ids"], n, stopping_criteria=StoppingCriteriaList([first]))
    wall = time.perf_counter() - t0
    prefill = (first.at or time.perf_counter()) - t0
    new = out[:, state["ids"].shape[1]:]
    row = Row("accelerate", rep, wall, prefill, wall - prefill, new.numel())
    return row, new.tolist(), {"peak_rss": memory.read()["host"], "requested": state["disk_per_forward"] * n}


def run(state: dict, rep: int, n: int):
    return state["run"](state, rep, n)


class _FirstToken:
    """A stopping criterion that never stops and notes when it is first asked: the end of prefill, since
    `generate` asks after each forward (HF's `generate` has no phase timers)."""

    at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def accelerate_device_map(path: Path, budget: int) -> tuple[dict[str, str], int, int]:
    """(device map, fp32 bytes resident on "cpu", checkpoint bytes on "disk") filling `budget` in order.

    Units are accelerate's: modules of the model's `_no_split_modules` classes, else leaf modules. A unit
    whose weights are all tied to an already placed one (a tied head) follows it, as accelerate requires.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from runtime.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    stored = ckpt.storage_dtype().itemsize
    ckpt.close()
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    meta.tie_weights()
    device_map: dict[str, str] = {}
    placed: dict[int, str] = {}  # id(parameter) -> device
    resident = on_disk = 0
    for name, module in _units(meta, set(meta._no_split_modules)):
        params = list(module.parameters())
        new = [p for p in params if id(p) not in placed]
        if not new:
            device_map[name] = placed[id(params[0])]
            continue
        numel = sum(p.numel() for p in new)
        device = "cpu" if resident + 4 * numel <= budget else "disk"
        resident += 4 * numel if device == "cpu" else 0
        on_disk += stored * numel if device == "disk" else 0
        device_map[name] = device
        placed.update((id(p), device) for p in new)
    return device_map, resident, on_disk


def _units(module: torch.nn.Module, no_split: set[str], prefix: str = ""):
    for name, child in module.named_children():
        if type(child).__name__ in no_split or next(child.children(), None) is None:
            if next(child.parameters(), None) is not None:
                yield prefix + name, child
        else:
            yield from _units(child, no_split, f"{prefix}{name}.")
