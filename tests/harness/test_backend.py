"""`RuntimeBackend` gives HELM what the engine computes: same log-probs and ids, in few batched calls."""

from __future__ import annotations

import pytest

pytest.importorskip("helm")

from helm.common.request import Request  # noqa: E402

from harness.helm.backend import get_backend, policy_from  # noqa: E402

PROMPTS = ["the quick brown fox", "she sells sea shells by", "a stitch in time", "all that glitters"]


def req(prompt: str, **kw) -> Request:
    kw.setdefault("temperature", 0.0)
    return Request(model="flexhelm/t", model_deployment="flexhelm/t", prompt=prompt, **kw)


@pytest.fixture(scope="module")
def backend(tiny_opt):
    folder, _ = tiny_opt()
    return get_backend(folder, {"gpu_batch_size": 2, "num_gpu_batches": 2})


def ids_of(backend, text: str) -> list[int]:
    return backend.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_echo_logprobs_equal_engine_score(backend):
    out = backend.process_batch([req("</s>" + p, echo_prompt=True, max_tokens=0) for p in PROMPTS])
    assert [c.kind for c in out.calls] == ["score"] and out.calls[0].num_requests == len(PROMPTS)
    for p, result in zip(PROMPTS, out.results):
        ids = ids_of(backend, "</s>" + p)
        (score,) = backend.engine.score([ids[:1]], [ids[1:]]).scores
        (c,) = result.completions
        assert result.success and result.batch_size == len(PROMPTS) and result.batch_request_time > 0
        assert c.text == "</s>" + p and len(c.tokens) == len(ids)
        assert c.tokens[0].logprob == 0.0 and c.tokens[0].text == "</s>"
        assert [t.logprob for t in c.tokens[1:]] == pytest.approx(score.token_logprobs, abs=1e-5)
        assert c.logprob == pytest.approx(score.logprob, abs=1e-4)


def test_greedy_generation_equals_engine_generate(backend):
    out = backend.process_batch([req(p, max_tokens=6) for p in PROMPTS])
    assert [c.kind for c in out.calls] == ["generate"]
    direct = backend.engine.generate([backend.prefix_ids + ids_of(backend, p) for p in PROMPTS], 6)
    for result, gen in zip(out.results, direct.generations):
        (c,) = result.completions
        assert c.text == backend.tokenizer.decode(gen.output_ids)
        assert [t.logprob for t in c.tokens] == pytest.approx(gen.logprobs, abs=1e-5)
        assert c.finish_reason == {"reason": {"eos": "endoftext"}.get(gen.finish_reason, gen.finish_reason)}


def test_stop_sequence_truncates_text_and_tokens(backend):
    (free,) = backend.process([req(PROMPTS[0], max_tokens=12)])[0].completions
    # a stop that the model's own output contains, after its first token
    stop = next(t.text for t in free.tokens[1:] if t.text.strip() and not t.text.startswith("bytes:"))
    (c,) = backend.process([req(PROMPTS[0], max_tokens=12, stop_sequences=[stop])])[0].completions
    assert c.text == free.text[:free.text.index(stop)]
    assert c.finish_reason == {"reason": "stop"}
    assert len(c.tokens) <= len(free.tokens) and c.logprob == pytest.approx(sum(t.logprob for t in c.tokens))
    assert [t.logprob for t in c.tokens] == pytest.approx([t.logprob for t in free.tokens[:len(c.tokens)]])


def test_num_completions_sampled_and_greedy(backend):
    out = backend.process_batch([req(PROMPTS[1], max_tokens=5, temperature=1.0, num_completions=3, random="r"),
                                 req(PROMPTS[2], max_tokens=5, num_completions=2)])
    sampled, greedy = out.results
    assert len(sampled.completions) == 3 and len({c.text for c in sampled.completions}) > 1
    assert len(greedy.completions) == 2 and greedy.completions[0] == greedy.completions[1]
    assert sorted(c.num_sequences for c in out.calls) == [1, 3]  # greedy repeats are computed once
    again = backend.process([req(PROMPTS[1], max_tokens=5, temperature=1.0, num_completions=3, random="r")])[0]
    assert [c.text for c in again.completions] == [c.text for c in sampled.completions]


def test_echo_with_generation_returns_prompt_then_output(backend):
    (c,) = backend.process([req(PROMPTS[3], echo_prompt=True, max_tokens=4)])[0].completions
    ids = ids_of(backend, PROMPTS[3])
    (gen,) = backend.engine.generate([ids], 4).generations
    assert c.text == PROMPTS[3] + backend.tokenizer.decode(gen.output_ids)
    assert len(c.tokens) == len(ids) + len(gen.output_ids)
    assert [t.logprob for t in c.tokens[len(ids):]] == pytest.approx(gen.logprobs, abs=1e-5)


def test_long_prompts_are_left_truncated_to_fit(backend):
    window = backend.max_positions
    long = " ".join(["fox"] * (window + 20))
    gen, echo = backend.process([req(long, max_tokens=5), req(long, echo_prompt=True, max_tokens=0)])
    assert gen.success and len(gen.completions[0].tokens) == 5
    assert echo.success and len(echo.completions[0].tokens) == window + 1  # the first token is context only


def test_bad_requests_fail_alone_and_are_not_retried(backend):
    results = backend.process([req(PROMPTS[0], embedding=True), req(PROMPTS[0], max_tokens=2),
                               req(PROMPTS[0], max_tokens=backend.max_positions)])
    assert [r.success for r in results] == [False, True, False]
    assert all(r.error_flags.is_retriable is False for r in (results[0], results[2]))


def test_calls_expose_runtime_stats(backend):
    backend.drain_calls()
    backend.process([req(PROMPTS[0], max_tokens=3), req(PROMPTS[1], echo_prompt=True, max_tokens=0)])
    calls = backend.drain_calls()
    assert {c.kind for c in calls} == {"generate", "score"} and backend.drain_calls() == []
    for c in calls:
        j = c.to_json()
        assert j["wall_s"] >= j["prefill_s"] + j["decode_s"] > 0 and j["prompt_tokens"] > 0 and j["peak_memory"]


def test_one_backend_per_model_and_policy(backend, tiny_opt):
    folder, _ = tiny_opt()
    assert get_backend(folder, '{"gpu_batch_size": 2, "num_gpu_batches": 2}') is backend
    assert get_backend(folder) is not backend
    assert policy_from(None) == policy_from("{}")
