"""CUDA path: fp16 compute against HF's fp32 logits, for every tier. Deselected by default (`-m gpu`)."""

from __future__ import annotations

import pytest
import torch

from runtime import Engine, Policy
from runtime.policy import Placement

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
    trace = engine.trace_logits(PROMPTS, [[40, 41]] * len(PROMPTS))
    T = max(map(len, PROMPTS))
    for r, p in enumerate(PROMPTS):
        with torch.no_grad():
            ref = model(torch.tensor([p + [40, 41]])).logits[0]
        torch.testing.assert_close(trace[0][r, T - len(p):].cpu(), ref[: len(p)], atol=2e-2, rtol=0)
        torch.testing.assert_close(trace[2][r, 0].cpu(), ref[len(p) + 1], atol=2e-2, rtol=0)
    stats = engine.generate(PROMPTS, 4).stats
    assert stats.peak_memory["device"] > 0
