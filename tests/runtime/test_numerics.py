"""The engine against HF `OPTForCausalLM` in fp32: logits, greedy generation, scores, rolling scores.

Tolerance: 1e-4 max abs on logits (fp32; the fused q/k/v matmul and SDPA reorder sums, ~1e-7 seen).
"""

from __future__ import annotations

import pytest
import torch

from runtime import Engine, Policy, WeightFormat
from runtime.kernels import CastWeight

ATOL = 1e-4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [3] * 9, [20, 21, 22, 23, 24]]
VARIANTS = ["pre", "350m", "untied"]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (T, V)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_decode_logits_match_hf(tiny_opt, variant):
    path, model = tiny_opt(variant)
    engine = Engine(path, Policy(gpu_batch_size=2, num_gpu_batches=2))
    forced = [[30 + r, 40 + r, 50 + r, 60 + r] for r in range(len(PROMPTS))]
    trace = engine.trace_logits(PROMPTS, forced)  # one block, left-padded to the longest prompt
    T = max(map(len, PROMPTS))
    assert len(trace) == 1 + len(forced[0])
    for r, (p, f) in enumerate(zip(PROMPTS, forced)):
        ref = hf_logits(model, p + f)  # unpadded reference
        torch.testing.assert_close(trace[0][r, T - len(p):], ref[: len(p)], atol=ATOL, rtol=0)
        for step in range(len(f)):
            torch.testing.assert_close(trace[1 + step][r, 0], ref[len(p) + step], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_hf_generate(tiny_opt, variant):
    path, model = tiny_opt(variant)
    result = Engine(path, Policy(gpu_batch_size=4)).generate(PROMPTS, 16, stop_at_eos=False)
    for p, g in zip(PROMPTS, result.generations):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 pad_token_id=0)[0, len(p):]
        assert g.output_ids == ref.tolist()
        assert g.finish_reason == "length"
        # log-probs are the model's own distribution at each chosen token
        lp = torch.log_softmax(hf_logits(model, p + g.output_ids), -1)
        want = [lp[len(p) - 1 + i, t].item() for i, t in enumerate(g.output_ids)]
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(want), atol=ATOL, rtol=0)
    assert result.stats.generated_tokens == 16 * len(PROMPTS)
    assert result.stats.prefill_s > 0 and result.stats.decode_s > 0
    assert result.stats.peak_memory["host"] > 0


@pytest.mark.parametrize("family, variant", [("opt", "pre"), ("opt", "350m"), ("llama", "llama-gqa"),
                                             ("llama", "qwen2-bias")])
def test_a_step_of_more_rows_than_a_row_chunk_equals_hf(request, family, variant):
    """24 sequences of 90 tokens in one micro-batch: 2160 rows, whose per-token work (norms, projections, MLP) runs
    in `policy.ROW_CHUNK` blocks of rows (`layers.by_rows`)."""
    from runtime.policy import ROW_CHUNK

    path, model = request.getfixturevalue(f"tiny_{family}")(variant)
    contexts = [[(7 * i + 3 * r) % 290 + 5 for i in range(88)] for r in range(24)]
    conts = [[20 + r, 21] for r in range(24)]
    assert sum(map(len, contexts)) + sum(map(len, conts)) > ROW_CHUNK
    scores = Engine(path, Policy(gpu_batch_size=24)).score(contexts, conts).scores
    for c, x, s in zip(contexts, conts, scores):
        lp = torch.log_softmax(hf_logits(model, c + x), -1)
        assert s.token_logprobs == pytest.approx([lp[len(c) - 1 + i, t].item() for i, t in enumerate(x)], abs=ATOL)


@pytest.mark.parametrize("variant", ["pre", "350m"])
def test_score_equals_hf_log_probs(tiny_opt, variant):
    path, model = tiny_opt(variant)
    engine = Engine(path, Policy(gpu_batch_size=2))
    contexts = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]]
    conts = [[20, 21], [22, 23, 24, 25], [26]]
    result = engine.score(contexts, conts)
    for c, x, s in zip(contexts, conts, result.scores):
        lp = torch.log_softmax(hf_logits(model, c + x), -1)
        want = [lp[len(c) - 1 + i, t].item() for i, t in enumerate(x)]
        assert s.logprob == pytest.approx(sum(want), abs=ATOL)
        assert s.token_logprobs == pytest.approx(want, abs=ATOL)
        greedy = all(lp[len(c) - 1 + i].argmax().item() == t for i, t in enumerate(x))
        assert s.is_greedy == greedy


def test_score_is_greedy_for_the_greedy_continuation(tiny_opt):
    path, _ = tiny_opt("pre")
    engine = Engine(path)
    gen = engine.generate([[5, 6, 7]], 4, stop_at_eos=False).generations[0]
    s = engine.score([[5, 6, 7], [5, 6, 7]], [gen.output_ids, gen.output_ids[:-1] + [(gen.output_ids[-1] + 1) % 300]])
    assert s.scores[0].is_greedy and not s.scores[1].is_greedy
    assert s.scores[0].logprob == pytest.approx(sum(gen.logprobs), abs=ATOL)


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (96, 96)])
def test_score_rolling_matches_hf_windows(tiny_opt, window, stride):
    path, model = tiny_opt("pre")
    stream = [(7 * i + 3) % 297 + 2 for i in range(70)]
    result = Engine(path, Policy(gpu_batch_size=3)).score_rolling([stream, stream[:10]], window, stride,
                                                                  prefix_token_id=1)
    seq = [1] + stream
    want = []
    a = 1
    while a < len(seq):  # the reference: every window scored by HF separately
        b = min(a + stride, len(seq))
        s = max(0, b - 1 - window)
        lp = torch.log_softmax(hf_logits(model, seq[s:b - 1]), -1)
        want += [lp[j - 1 - s, seq[j]].item() for j in range(a, b)]
        a = b
    assert len(result.token_logprobs[0]) == len(stream)
    assert result.token_logprobs[0] == pytest.approx(want, abs=ATOL)
    assert result.token_logprobs[1] == pytest.approx(want[:10], abs=ATOL)  # same context: window covers it


def test_rolling_without_prefix_skips_first_token(tiny_opt):
    path, _ = tiny_opt("pre")
    out = Engine(path).score_rolling([[5, 6, 7, 8]], window=8)
    assert len(out.token_logprobs[0]) == 3


@pytest.mark.parametrize("policy", [Policy(gpu_batch_size=1), Policy(gpu_batch_size=2, num_gpu_batches=3),
                                    Policy(gpu_batch_size=8)])
def test_results_do_not_depend_on_padding_bucketing_or_batching(tiny_opt, policy):
    path, _ = tiny_opt("350m")
    ref_engine = Engine(path, Policy(gpu_batch_size=1))
    alone = [ref_engine.generate([p], 12, stop_at_eos=False).generations[0] for p in PROMPTS]
    batched = Engine(path, policy).generate(PROMPTS, 12, stop_at_eos=False).generations
    for a, b in zip(alone, batched):
        assert a.output_ids == b.output_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_fp16_checkpoint_kept_in_storage_dtype_matches_converted(tiny_opt):
    path, model = tiny_opt("pre", "safetensors", torch.float16)
    converted = Engine(path, Policy(weight_format=WeightFormat.COMPUTE))
    kept = Engine(path, Policy(weight_format="checkpoint", gpu_batch_size=2))
    assert kept.weights.layers[1]["qkv.weight"].dtype == torch.float16
    assert converted.weights.layers[1]["qkv.weight"].dtype == torch.float32
    assert kept.weights.nbytes * 2 == converted.weights.nbytes
    a = converted.generate(PROMPTS, 8, stop_at_eos=False).generations
    b = kept.generate(PROMPTS, 8, stop_at_eos=False).generations
    assert [g.output_ids for g in a] == [g.output_ids for g in b]
    # kept fp16 matrices reach `linear` as CastWeights (converted block by block): the same logits
    with torch.inference_mode():
        assert isinstance(kept.weights.fetch(1)["qkv.weight"], CastWeight)
    torch.testing.assert_close(kept.trace_logits([PROMPTS[0]], [[9]])[0][0],
                               converted.trace_logits([PROMPTS[0]], [[9]])[0][0], atol=1e-5, rtol=0)
    # and the fp16 checkpoint computes in fp32: logits equal HF's fp32 model of the same fp16 weights
    trace = converted.trace_logits([PROMPTS[0]], [[9]])
    torch.testing.assert_close(trace[0][0], hf_logits(model.half().float(), PROMPTS[0]), atol=ATOL, rtol=0)
