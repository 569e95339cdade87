"""The benchmark workloads as plain data (no torch import), so listing them stays cheap."""

from __future__ import annotations

from dataclasses import dataclass, replace

W4_SETUPS = ("W1c", "W2")
"""The two halves of W4 (`harness.bench.w4`), measurable alone with `flexhelm bench W4 --setup NAME`."""


@dataclass(frozen=True)
class Workload:
    """One side-by-side throughput comparison: same prompts, same batch, ours against an HF baseline."""

    name: str
    description: str
    model: str
    """Key of `random_models.ARCHS` (harness/planning/random_models.py)."""
    batch: int
    prompt_len: int
    output_len: int
    repeats: int = 3
    """A B pairs measured after one warm-up of each; the ratio is the median over pairs."""
    ram_probe_bytes: int = 2**30
    """Size of the tensor summed to measure RAM bandwidth (large enough to defeat the caches)."""
    weight_ram_bytes: int | None = None
    """Most bytes of weights kept in RAM, the rest read from disk each step; None: all in RAM."""
    ram_budget: int | None = None
    """RAM the whole process may use (peak RSS), for workloads that plan within a budget (W1c, W4)."""
    module: str = "w1"
    """The `harness.bench` module whose `run(workload, out_dir)` runs it."""
    quick: bool = False
    """The smoke-test variant (`shrink`): optional baselines may be skipped."""
    setups: tuple[str, ...] = ()
    """W4: the setups to measure (W1c, W2); empty: all. Each takes 40-50 minutes on 2 cores, so they can be
    measured in separate sittings of an idle machine."""

    def shrink(self) -> Workload:
        """The quick variant: a tiny model of the same family and a few tokens, same code path, for a smoke test."""
        from harness.planning.random_models import ARCHS, spec

        tiny = "opt-tiny" if self.model not in ARCHS or spec(self.model).family == "opt" else "llama-tiny"
        budget = None if self.weight_ram_bytes is None else _QUICK_BUDGET[tiny]
        return replace(self, model=tiny, batch=4, prompt_len=16, output_len=8, repeats=1,
                       ram_probe_bytes=32 * 2**20, weight_ram_bytes=budget, quick=True)


_QUICK_BUDGET = {"opt-tiny": int(6.4 * 2**20), "llama-tiny": int(0.3 * 2**20)}
"""Weights in RAM of the quick offloading workloads: the tables (opt-tiny: 6.7 of its 7.1 MB of fp16 weights;
llama-tiny: 0.25 of 0.4 MB), which stay in RAM, and a part of a decoder layer, so most layers stream from disk."""


_ALL = (
    Workload("W1a", "engine efficiency, small model: opt-125m, batch 16, prompt 128, output 32, all in RAM, "
             "fp32; ours/HF generate throughput and fraction of roofline", "opt-125m", 16, 128, 32),
    Workload("W1b", "engine efficiency, compute-heavy: opt-1.3b, batch 8, prompt 64, output 32, all in RAM, "
             "fp32; ours/HF generate throughput and fraction of roofline", "opt-1.3b", 8, 64, 32),
    # Three A/B pairs (~15 minutes): every run streams the model from disk for each of 32 steps, and this
    # disk's rate drifts from run to run (one policy: 8.3 tok/s in one run, 11.0-11.4 in others an hour apart).
    Workload("W2", "offloading: opt-1.3b stored fp16, at most 0.5 GiB of weights in RAM, the rest read from "
             "disk past the page cache, batch 16, prompt 32, output 32; ours/accelerate throughput and fraction "
             "of roofline", "opt-1.3b", 16, 32, 32, repeats=3, weight_ram_bytes=2**29, module="w2"),
    Workload("W1L", "engine efficiency, Llama family: TinyLlama-1.1B's shape (GQA 32/4 heads, SwiGLU), batch 8, "
             "prompt 64, output 32, all in RAM, fp32; ours/HF generate throughput and fraction of roofline",
             "tinyllama-1.1b", 8, 64, 32),
    Workload("W2L", "offloading, Llama family: W2's setup on TinyLlama-1.1B's shape (stored fp16, at most 0.5 GiB of "
             "weights in RAM, the rest read from disk past the page cache, batch 16, prompt 32, output 32); "
             "ours/accelerate throughput and fraction of roofline", "tinyllama-1.1b", 16, 32, 32, repeats=3,
             weight_ram_bytes=2**29, module="w2"),
    Workload("W3", "compression: W2's setup with 4-bit weights and KV cache (group 64) against fp16, both ours; "
             "4bit/fp16 throughput", "opt-1.3b", 16, 32, 32, repeats=1, weight_ram_bytes=2**29, module="w3"),
    Workload("W1c", "value of the policy: opt-1.3b, 64 prompts, prompt 32, output 32, 6 GiB for the whole process; "
             "auto policy / HF generate at its best batch within the budget", "opt-1.3b", 64, 32, 32, repeats=1,
             ram_budget=6 * 2**30, module="w1c"),
    Workload("W4", "policy search: W1c's and W2's setups, >= 20 hand-written policies measured plus auto; "
             "auto/best and the cost model's median prediction error", "opt-1.3b", 64, 32, 32, repeats=1,
             ram_budget=6 * 2**30, module="w4"),
    # Not a speed ratio: the accuracy cost of compression on the shipped reference model (batch 32).
    Workload("quality", "compression quality: WikiText-2 test perplexity and LAMBADA accuracy of the reference "
             "model, stored precision against 4-/3-bit weights and cache", "opt-ref", 32, 0, 0, module="quality"),
    # The batch and lengths are the quickstart suite's (suites/quickstart.yaml), which W5 runs as it is.
    Workload("W5", "harness overhead: the quickstart suite from scratch (SmolLM2-135M-Instruct: LAMBADA, "
             "WikiText-2, MMLU, synthetic sweep; fp16 and 4-bit); time outside the runtime / wall time",
             "smollm2-135m", 32, 64, 32, repeats=1, module="w5"),
    # Not an engine comparison: the matmul paths (fp32, int4, int8) on three models' decoder layers, at 1-256 rows.
    Workload("kernels", "CPU matmul paths: one decoder layer of SmolLM2-135M, TinyLlama-1.1B and opt-1.3b at m = 1, "
             "8, 16, 64, 256 rows, fp32 against the int4 kernel and int8 compute; int8/fp32 and int8/int4",
             "smollm2-135m", 0, 0, 0, repeats=1, module="kernels"),
    # The peers run the GGUF themselves (harness/bench/llamacpp_peer.py, llamacpp_server_peer.py); quick mode runs
    # ours only, on the shipped reference model.
    Workload("W6", "llama.cpp, the CPU peer (compiled for this CPU, and its prebuilt wheel), on the same GGUF "
             "(SmolLM2-135M-Instruct Q4_1): 64 prompts of 256 tokens, 64 generated, swept over batch / parallel "
             "sequences; LAMBADA greedy accuracy of each; "
             "ours/llamacpp throughput", "smollm2-135m", 64, 256, 64, repeats=2, module="w6"),
)
BY_NAME = {w.name: w for w in _ALL}
