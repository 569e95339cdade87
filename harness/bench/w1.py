"""W1a / W1b: engine efficiency with every weight in RAM, ours against HF transformers `generate`.

Both engines get the same prompts (random token ids, all of one length, so no padding), the same batch,
greedy decoding and exactly `output_len` new tokens, fp32 compute. Ours: `Engine.generate`, throughput
from its own prefill/decode timers. HF: `generate` of `AutoModelForCausalLM` under `inference_mode`, timed by
wall clock; its prefill is estimated by a separate `max_new_tokens=1` call in the same repetition and its
decode as the rest. The roofline (roofline.py) is measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from harness.bench import report, roofline
from harness.bench.measure import OtherLoad, Row, alternate, median_ratio, median_row
from harness.bench.workloads import Workload
from harness.planning import random_models

Ids = list[list[int]]
Runner = Callable[[int], tuple[Row, Ids]]  # rep -> (timings, generated ids per sequence)


def run(w: Workload, out_dir: Path) -> str:
    spec = random_models.spec(w.model)
    path = random_models.ensure_model(w.model)
    other = OtherLoad()
    print(f"{w.name}: {w.model} batch {w.batch}, prompt {w.prompt_len}, output {w.output_len}, "
          f"{w.repeats} A/B pairs, {torch.get_num_threads()} threads", flush=True)
    prompts = random_prompts(w, spec.vocab_size)
    ours, hf = ours_runner(path, w, prompts), hf_runner(path, w, prompts)  # both loaded before timing
    check_same_ids(w.name, ours(-1)[1], hf(-1)[1])  # the warm-ups double as the correctness check
    pairs = alternate(lambda rep: ours(rep)[0], lambda rep: hf(rep)[0], w.repeats)
    steps = roofline.generate_steps(w.batch, w.prompt_len, w.output_len)
    machine = roofline.measure(spec, steps, w.ram_probe_bytes)
    roof_prefill, roof_decode = roofline.roofline(spec, steps, machine)

    ours_rows, hf_rows = [a for a, _ in pairs], [b for _, b in pairs]
    roof = Row("roofline", 0, roof_prefill + roof_decode, roof_prefill, roof_decode, ours_rows[0].tokens)
    ratio = median_ratio(pairs, lambda r: r.throughput)
    fraction = roof.busy_s / statistics.median(r.busy_s for r in ours_rows)
    _print_record(w.name, ours_rows, hf_rows, roof, machine, pairs)
    print_other_load(w.name, other.cores())

    rows = [*ours_rows, *hf_rows, roof]
    print(f"{w.name} wrote {report.write_csv(rows, out_dir / f'{w.name}.csv')}")
    png = report.write_png(rows, out_dir / f"{w.name}.png", f"{w.name}: {w.model}, batch {w.batch}, "
                           f"prompt {w.prompt_len}, output {w.output_len}")
    if png:
        print(f"{w.name} wrote {png}")
    summary = f"{w.name} ours/hf={ratio:.2f} roofline={fraction:.2f}"
    print(summary, flush=True)
    return summary


def random_prompts(w: Workload, vocab: int) -> Ids:
    """Seeded random ids above the special tokens (OPT: pad 1, bos/eos 2; Llama: 0-2), all `prompt_len` long."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab, (w.batch, w.prompt_len), generator=g).tolist()


def ours_runner(path: Path, w: Workload, prompts: Ids) -> Runner:
    from runtime import Engine, Policy

    # device pinned to the CPU: the baseline runs there, and a CUDA machine would otherwise pick CUDA.
    engine = Engine(path, Policy(gpu_batch_size=w.batch, device="cpu"))
    return lambda rep: ours_generate(engine, prompts, w.output_len, rep)[:2]


def ours_generate(engine, prompts: Ids, output_len: int, rep: int) -> tuple[Row, Ids, dict[str, int]]:
    """One timed greedy `Engine.generate` of exactly `output_len` tokens: timings, ids, peak bytes per tier."""
    t0 = time.perf_counter()
    result = engine.generate(prompts, max_new_tokens=output_len, stop_at_eos=False)
    wall = time.perf_counter() - t0
    s = result.stats
    return (Row("ours", rep, wall, s.prefill_s, s.decode_s, s.generated_tokens),
            [g.output_ids for g in result.generations], dict(s.peak_memory))


def hf_runner(path: Path, w: Workload, prompts: Ids) -> Runner:
    model = load_hf(path)
    ids = torch.tensor(prompts)

    def call(rep: int) -> tuple[Row, Ids]:
        t0 = time.perf_counter()
        out = hf_generate(model, ids, w.output_len)
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf_generate(model, ids, 1)  # prefill and the first token only: HF's generate has no phase timers
        prefill = min(time.perf_counter() - t0, wall)
        new = out[:, ids.shape[1]:]
        return Row("hf", rep, wall, prefill, wall - prefill, new.numel()), new.tolist()

    return call


def load_hf(path: Path, **kwargs):
    """The HF model (`AutoModelForCausalLM`: OPT, Llama, ...) in fp32 (CPU compute: fp16 matmuls crawl here);
    `kwargs` go to `from_pretrained`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # generation-config chatter and progress bars would bury the record lines
    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def hf_generate(model, ids: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """Greedy `generate` of exactly `n` new tokens for (B, T) prompts of one length (no padding)."""
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=model.config.pad_token_id or 0, **kwargs)


def check_same_ids(name: str, ours: Ids, hf: Ids) -> float:
    """Fraction of sequences whose greedy ids equal HF's; fp32 on random weights may rarely diverge."""
    same = sum(a == b for a, b in zip(ours, hf))
    print(f"{name} check: greedy output ids equal HF's for {same}/{len(hf)} sequences")
    if same < len(hf):
        print(f"{name} warning: {len(hf) - same} sequences differ from HF's greedy output (near-tied "
              "logits in fp32 can flip a token on random weights; many differing rows would mean a bug)")
    return same / len(hf)


def _print_record(name: str, ours: list[Row], hf: list[Row], roof: Row, machine: roofline.Machine,
                  pairs: list[tuple[Row, Row]]) -> None:
    """Absolute figures, for the record only: they move with the machine's load."""
    for label, rows, note in (("ours", ours, ""), ("hf", hf, " (prefill: separate max_new_tokens=1 call)")):
        m = median_row(rows)
        tput = statistics.median(r.throughput for r in rows)
        print(f"{name} {label}: {tput:.1f} tok/s median; prefill {m.prefill_s:.3f} s + decode {m.decode_s:.3f} s, "
              f"wall {m.wall_s:.3f} s{note}")
    peaks = ", ".join(f"m={m}: {f / 1e9:.0f}" for m, f in sorted(machine.gemm_flops.items(), reverse=True))
    print(f"{name} roofline: {roof.throughput:.1f} tok/s; prefill {roof.prefill_s:.3f} s + decode "
          f"{roof.decode_s:.3f} s; GEMM peak GFLOP/s {peaks}; RAM {machine.ram_bytes_per_s / 1e9:.1f} GB/s")
    print(f"{name} ours/hf by wall clock around the call = {median_ratio(pairs, lambda r: 1 / r.wall_s):.2f}")


def print_other_load(name: str, cores: float | None) -> None:
    if cores is None:
        return
    note = "; the machine was busy, absolute figures are off (ratios less so)" if cores > 0.2 else ""
    print(f"{name} other processes used {cores:.2f} of {os.cpu_count()} cores on average during the run{note}")
