"""CUDA throughput in one run: ours (fp16 on the GPU; weights streamed from pinned host RAM; 4-bit weights) against
HF transformers on the GPU and accelerate's CPU offload, on a random-weight OPT (`harness.planning.random_models`,
built once), 64 prompts x 256 tokens, 32 new tokens each, greedy.

    PYTHONPATH=. python scripts/cuda_bench.py [MODEL [ENGINE,ENGINE...]]    # default opt-1.3b, every engine

Engines: ours_gpu, ours_host_weights, ours_w4_gpu, hf_gpu, accelerate_offload. Prints one line per engine, the
share of greedy tokens equal to HF's, and ours/HF ratios. `FH_DEVICE=cpu FH_B=4` runs it on a CPU (a dry run)."""
from __future__ import annotations

import gc
import os
import sys
import tempfile
import time

import torch

from harness.planning.random_models import ensure_model
from runtime import Engine, Policy
from runtime.policy import Placement, QuantConfig

NAME = sys.argv[1] if len(sys.argv) > 1 else "opt-1.3b"
ONLY = sys.argv[2].split(",") if len(sys.argv) > 2 else None
B, P, G = int(os.environ.get("FH_B", 64)), 256, 32
DEV = os.environ.get("FH_DEVICE", "cuda")
t0 = time.perf_counter()
path = ensure_model(NAME)
print(f"{NAME} ready in {time.perf_counter() - t0:.1f} s", flush=True)
gen = torch.Generator().manual_seed(0)
prompts = torch.randint(4, 50000, (B, P), generator=gen)
rows = [p.tolist() for p in prompts]
results, ids = {}, {}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def ours(label, **kw):
    if ONLY and label not in ONLY:
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as off:
        t = time.perf_counter()
        eng = Engine(path, Policy(device=DEV, gpu_batch_size=B, **kw), offload_dir=off)
        load = time.perf_counter() - t
        eng.generate(rows[:4], 2)  # warm-up
        r = eng.generate(rows, G)
        s = r.stats
        results[label] = s.throughput
        ids[label] = [g.output_ids for g in r.generations]
        print(f"{label}: {s.throughput:.1f} tok/s (prefill {s.prefill_s:.2f} s, decode {s.decode_s:.2f} s, "
              f"load {load:.1f} s, peak device {s.peak_memory.get('device', 0) / 2**30:.2f} GiB)", flush=True)
        eng.close()
    gc.collect()
    torch.cuda.is_available() and torch.cuda.empty_cache()


def hf(label, **kw):
    if ONLY and label not in ONLY:
        return
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, **kw).eval()
    if not kw:
        model.to(DEV)
    load = time.perf_counter() - t
    x = prompts.to(DEV)
    mask = torch.ones_like(x)
    with torch.no_grad():
        model.generate(x[:4], attention_mask=mask[:4], max_new_tokens=2, do_sample=False)
        sync()
        t = time.perf_counter()
        out = model.generate(x, attention_mask=mask, max_new_tokens=G, min_new_tokens=G, do_sample=False)
        sync()
        dt = time.perf_counter() - t
    results[label] = B * G / dt
    ids[label] = out[:, P:].tolist()
    print(f"{label}: {B * G / dt:.1f} tok/s ({dt:.2f} s, load {load:.1f} s)", flush=True)
    del model
    gc.collect()
    torch.cuda.is_available() and torch.cuda.empty_cache()


ours("ours_gpu")
ours("ours_host_weights", weights=Placement(0.0, 1.0))
ours("ours_w4_gpu", compress_weight=QuantConfig(bits=4, group_size=64))
hf("hf_gpu")
hf("accelerate_offload", device_map="auto", max_memory={0: "2GiB", "cpu": "200GiB"})
if "ours_gpu" in ids and "hf_gpu" in ids:
    same = sum(a == b for x, y in zip(ids["ours_gpu"], ids["hf_gpu"]) for a, b in zip(x, y)) / (B * G)
    first = sum(x[0] == y[0] for x, y in zip(ids["ours_gpu"], ids["hf_gpu"])) / B
    print(f"greedy ids equal to HF's: {same:.3f} of tokens, first token {first:.3f} of rows")
base = results.get("hf_gpu")
off = results.get("accelerate_offload")
print("CUDA " + NAME + " " + " ".join(f"{k}={v:.1f}" for k, v in results.items()))
if base and "ours_gpu" in results:
    print(f"ratio ours_gpu/hf_gpu={results['ours_gpu'] / base:.2f}")
if off and "ours_host_weights" in results:
    print(f"ratio ours_host_weights/accelerate_offload={results['ours_host_weights'] / off:.2f}")
