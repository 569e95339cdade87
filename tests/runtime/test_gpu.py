"""CUDA path: fp16 compute against HF's fp32 logits, for every tier. Deselected by default (`-m gpu`)."""

from __future__ import annotations

import pytest
import torch

from runtime import Engine, Policy, PolicyError
from runtime.policy import Placement, QuantConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.mark.parametrize("placement", [
    {}, {"weights": Placement(0.3, 0.3), "cache": Placement(0.0, 1.0)},
    {"weights": Placement(0, 0), "cache": Placement(0, 0), "activations": Placement(0, 0)},
])
@pytest.mark.parametrize("cpu_attention", [True, False])
def test_cuda_fp16_matches_hf_fp32(tiny_opt, tmp_path, placement, cpu_attention):
    path, model = tiny_opt("pre", "safetensors", torch.float16)
    engine = Engine(path, Policy(device="cuda", gpu_batch_size=2, cpu_attention=cpu_attention, **placement),
                    offload_dir=tmp_path)
    assert engine.dtype == torch.float16
    _check_against_hf(engine, model)
    stats = engine.generate(PROMPTS, 4).stats
    assert stats.peak_memory["device"] > 0


@pytest.mark.parametrize("placement", [
    {}, {"weights": Placement(0.0, 1.0), "cache": Placement(0.5, 0.0), "activations": Placement(0.0, 1.0)},
])
@pytest.mark.parametrize("cpu_attention", [True, False])
def test_cuda_llama_gqa_matches_hf_fp32(tiny_llama, tmp_path, placement, cpu_attention):
    """The Llama family (rotary positions, grouped KV heads) on CUDA in fp16, weights streamed from host or disk."""
    path, model = tiny_llama("llama-gqa", "safetensors", torch.float16)
    engine = Engine(path, Policy(device="cuda", gpu_batch_size=2, cpu_attention=cpu_attention, **placement),
                    offload_dir=tmp_path)
    _check_against_hf(engine, model)


def _check_against_hf(engine, model) -> None:
    """Teacher-forced logits of PROMPTS + [40, 41], prefill and second step, against HF's fp32 model."""
    trace = engine.trace_logits(PROMPTS, [[40, 41]] * len(PROMPTS))
    T = max(map(len, PROMPTS))
    for r, p in enumerate(PROMPTS):
        with torch.no_grad():
            ref = model(torch.tensor([p + [40, 41]])).logits[0]
        torch.testing.assert_close(trace[0][r, T - len(p):].cpu(), ref[: len(p)], atol=2e-2, rtol=0)
        torch.testing.assert_close(trace[2][r, 0].cpu(), ref[len(p) + 1], atol=2e-2, rtol=0)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_cuda_compressed_weights_and_cache_match_the_cpu(tiny_opt, tiny_llama, tmp_path, family):
    """4-bit weights and KV cache on CUDA against the same policy on the CPU (fp32, dense on the same stored weight
    values), offloaded or not. The weights' codes are the same (quantized on the CPU from the checkpoint); a cache
    code can round the other way where fp16 K/V fall near a rounding boundary, one step of 1/15 of its group's
    range, so the tolerance is wider than fp16's alone (measured on an H200: at most 0.075 over 6300 logits)."""
    path, _ = tiny_opt("pre", "safetensors", torch.float16) if family == "opt" else tiny_llama()
    q = QuantConfig(bits=4, group_size=16)
    forced = [[40, 41, 42]] * len(PROMPTS)
    cpu = Engine(path, Policy(device="cpu", gpu_batch_size=2, compress_weight=q, compress_cache=q,
                              int4_dense_rows=1))
    want = cpu.trace_logits(PROMPTS, forced)
    for placement in ({}, {"weights": Placement(0.0, 0.5), "cache": Placement(0.0, 1.0)}):
        engine = Engine(path, Policy(device="cuda", gpu_batch_size=2, compress_weight=q, compress_cache=q,
                                     **placement), offload_dir=tmp_path / str(len(placement)))
        got = engine.trace_logits(PROMPTS, forced)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.float().cpu(), w.float(), atol=0.15, rtol=0)


def test_cuda_scores_match_the_cpu(tiny_llama, tmp_path):
    """`score` (likelihood requests, no KV cache) on CUDA against the CPU's fp32 log-probabilities."""
    path, _ = tiny_llama()
    contexts, conts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]], [[14, 15], [16], [17, 18, 19]]
    want = Engine(path, Policy(device="cpu", gpu_batch_size=2)).score(contexts, conts)
    got = Engine(path, Policy(device="cuda", gpu_batch_size=2, weights=Placement(0.0, 1.0)),
                 offload_dir=tmp_path).score(contexts, conts)
    for g, w in zip(got.scores, want.scores):
        assert g.logprob == pytest.approx(w.logprob, abs=2e-2)
        assert g.is_greedy == w.is_greedy


def test_cuda_refuses_int8_compute(tiny_llama):
    path, _ = tiny_llama()
    with pytest.raises(PolicyError, match="int8 runs on the CPU"):
        Engine(path, Policy(device="cuda", compute="int8"))
