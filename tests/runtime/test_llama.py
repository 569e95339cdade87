"""The Llama family (Llama, Mistral, Qwen2) against HF transformers in fp32: logits at prefill and every decode
step on a left-padded batch of mixed lengths, greedy generation, scores and rolling scores, for every variant of
`tests/tiny_models.LLAMA_VARIANTS` (GQA, MQA, tied and untied heads, an explicit head_dim, each rope scaling type,
Qwen2's biases, Mistral's sliding window); the same under offloading and with 4-bit weights.

The reference is HF run incrementally with its own cache, one sequence at a time: what HF computes at each decode
step (with dynamic rope scaling a single forward over the whole sequence would use other frequencies).
Tolerance: 1e-4 max abs on logits (fused q/k/v and gate/up matmuls and SDPA reorder sums; ~6e-7 seen).
"""

from __future__ import annotations

import pytest
import torch

from runtime import Engine, Policy
from runtime.policy import Placement
from tests import tiny_models

ATOL = 1e-4
VARIANTS = list(tiny_models.LLAMA_VARIANTS)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [3] * 9, [20, 21, 22, 23, 24]]
FORCED = [[30 + r, 40 + r, 50 + r, 60 + r] for r in range(len(PROMPTS))]
OFFLOADED = {
    "all on disk": Policy(gpu_batch_size=2, num_gpu_batches=2, weights=Placement(0, 0), cache=Placement(0, 0),
                          activations=Placement(0, 0)),
    "split": Policy(gpu_batch_size=2, num_gpu_batches=3, weights=Placement(0.4, 0.3), cache=Placement(0.5, 0.2),
                    activations=Placement(0.5, 0)),
    "on disk, sequential": Policy(gpu_batch_size=3, weights=Placement(0, 0), cache=Placement(0, 0), overlap=False),
}


def _reset_rotary(model) -> None:
    """HF's dynamic rope keeps the longest length it has seen; a fresh sequence starts from the original."""
    rot = model.model.rotary_emb
    if hasattr(rot, "original_inv_freq"):
        rot.inv_freq = rot.original_inv_freq.clone()
        rot.max_seq_len_cached = rot.original_max_seq_len


def hf_trace(model, prompt: list[int], forced: list[int]) -> list[torch.Tensor]:
    """HF's logits for one sequence: (T, V) at prefill, then (V,) at each decode step of `forced`."""
    _reset_rotary(model)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        logits = [out.logits[0]]
        for t in forced:
            out = model(torch.tensor([[t]]), cache=out.cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return logits


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probs of one forward over `ids`, as scoring computes them."""
    _reset_rotary(model)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)


def assert_trace_matches_hf(trace: list[torch.Tensor], model, atol: float = ATOL) -> None:
    T = max(map(len, PROMPTS))
    assert len(trace) == 1 + len(FORCED[0])
    for r, (p, f) in enumerate(zip(PROMPTS, FORCED)):
        ref = hf_trace(model, p, f)
        torch.testing.assert_close(trace[0][r, T - len(p):], ref[0], atol=atol, rtol=0)
        for step in range(len(f)):
            torch.testing.assert_close(trace[1 + step][r, 0], ref[1 + step], atol=atol, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_decode_logits_match_hf(tiny_llama, variant):
    path, model = tiny_llama(variant)
    engine = Engine(path, Policy(gpu_batch_size=2, num_gpu_batches=2))
    assert_trace_matches_hf(engine.trace_logits(PROMPTS, FORCED), model)


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-dynamic", "mistral-window", "qwen2-bias"])
@pytest.mark.parametrize("placement", list(OFFLOADED))
def test_offloading_never_changes_results(tiny_llama, variant, placement, tmp_path):
    path, model = tiny_llama(variant)
    in_memory = Engine(path, Policy(gpu_batch_size=2, num_gpu_batches=2)).trace_logits(PROMPTS, FORCED)
    engine = Engine(path, OFFLOADED[placement], offload_dir=tmp_path)
    trace = engine.trace_logits(PROMPTS, FORCED)
    assert engine.weights.bytes_by_tier()["disk"] > 0
    for a, b in zip(trace, in_memory):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert_trace_matches_hf(trace, model)
    engine.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_hf_generate(tiny_llama, variant):
    path, model = tiny_llama(variant)
    n = 6  # the dynamic variant's longest prompt + 6 stays within its scaled 16 positions
    result = Engine(path, Policy(gpu_batch_size=3)).generate(PROMPTS, n, stop_at_eos=False)
    for p, g in zip(PROMPTS, result.generations):
        _reset_rotary(model)
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)[0, len(p):]
        assert g.output_ids == ref.tolist()
        # log-probs of the raw next-token distribution at each chosen token, as HF computes them step by step
        trace = hf_trace(model, p, g.output_ids[:-1])
        want = [torch.log_softmax(trace[0][-1], -1)[g.output_ids[0]].item()]
        want += [torch.log_softmax(t, -1)[tok].item() for t, tok in zip(trace[1:], g.output_ids[1:])]
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(want), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["llama-mqa-tied-headdim", "mistral-window", "qwen2-bias"])
def test_score_and_rolling_equal_hf_log_probs(tiny_llama, variant):
    path, model = tiny_llama(variant)
    engine = Engine(path, Policy(gpu_batch_size=2))
    contexts = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]]
    conts = [[20, 21], [22, 23, 24, 25], [26]]
    for c, x, s in zip(contexts, conts, engine.score(contexts, conts).scores):
        lp = hf_logprobs(model, c + x)
        want = [lp[len(c) - 1 + i, t].item() for i, t in enumerate(x)]
        assert s.token_logprobs == pytest.approx(want, abs=ATOL)
        assert s.is_greedy == all(lp[len(c) - 1 + i].argmax().item() == t for i, t in enumerate(x))
    stream = [(7 * i + 3) % 297 + 2 for i in range(40)]
    window, stride = 16, 5
    got = engine.score_rolling([stream], window, stride, prefix_token_id=1).token_logprobs[0]
    seq, want, a = [1] + stream, [], 1
    while a < len(seq):  # every window scored by HF separately
        b = min(a + stride, len(seq))
        s = max(0, b - 1 - window)
        lp = hf_logprobs(model, seq[s:b - 1])
        want += [lp[j - 1 - s, seq[j]].item() for j in range(a, b)]
        a = b
    assert got == pytest.approx(want, abs=ATOL)


def test_kv_cache_holds_kv_heads_only(tiny_llama):
    path, _ = tiny_llama("llama-mqa-tied-headdim")  # 4 query heads, 1 KV head of 16
    engine = Engine(path, Policy(gpu_batch_size=8))
    engine.generate(PROMPTS, 4, stop_at_eos=False)
    s = engine.spec
    rows = max(map(len, PROMPTS)) + 4
    assert engine.runner.cache_peak["device"] == s.num_layers * 2 * len(PROMPTS) * rows * 1 * 16 * 4  # fp32


@pytest.mark.parametrize("compress", [{"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 16}])
def test_compressed_generations_identical_across_placements(tmp_path, compress):
    """4-bit weights (group 32: the fused int4 kernel; 16: dequantized next to compute) and a 4-bit cache: the
    same quantized math on every tier."""
    path = tmp_path / "model"
    tiny_models.build_llama(path, "qwen2-bias", hidden_size=64, intermediate_size=128)
    base = dict(compress_weight=compress, compress_cache={"bits": 4, "group_size": 16})
    ref = Engine(path, Policy(gpu_batch_size=2, num_gpu_batches=2, **base)).generate(PROMPTS, 8, stop_at_eos=False)
    for name, policy in OFFLOADED.items():
        engine = Engine(path, Policy(**{**policy.to_json(), **base}), offload_dir=tmp_path / name)
        got = engine.generate(PROMPTS, 8, stop_at_eos=False)
        for a, b in zip(ref.generations, got.generations):
            assert a.output_ids == b.output_ids, name
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5), name
        engine.close()


def test_generation_stops_at_any_eos(tiny_llama, tmp_path):
    path, _ = tiny_llama("llama3")
    engine = Engine(path)
    assert engine.spec.eos_token_ids == (1, 2)
    free = engine.generate(PROMPTS, 10, stop_at_eos=False).generations
    first, second = free[0].output_ids[3], free[1].output_ids[2]
    engine = Engine(tiny_models.with_eos(path, tmp_path / "eos", (first, second)))  # the same model, those EOS
    assert set(engine.spec.eos_token_ids) == {first, second}
    res = engine.generate(PROMPTS, 10).generations
    for g, f in zip(res[:2], free[:2]):
        assert g.finish_reason == "eos"
        assert g.output_ids == f.output_ids[:next(i for i, t in enumerate(f.output_ids) if t in (first, second))]
