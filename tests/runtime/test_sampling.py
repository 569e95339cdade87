"""Sampling (seeded, top-k, top-p), stop sequences and EOS."""

from __future__ import annotations

import pytest
import torch

from runtime import Engine, Policy
from runtime.sampling import Sampler
from tests import tiny_models

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture(scope="module")
def engine(tiny_opt):
    return Engine(tiny_opt("pre")[0], Policy(gpu_batch_size=2))


def _ids(result):
    return [g.output_ids for g in result.generations]


def test_sampling_reproducible_per_seed_and_independent_of_batch(engine):
    kw = dict(temperature=1.0, seed=7, stop_at_eos=False)
    a = engine.generate(PROMPTS, 10, **kw)
    assert _ids(a) == _ids(engine.generate(PROMPTS, 10, **kw))
    assert _ids(a) != _ids(engine.generate(PROMPTS, 10, **{**kw, "seed": 8}))
    other = Engine(engine.path, Policy(gpu_batch_size=1))  # other batch shapes, same rows
    assert _ids(a) == _ids(other.generate(PROMPTS, 10, **kw))


def test_top_k_1_is_greedy(engine):
    greedy = engine.generate(PROMPTS, 8, stop_at_eos=False)
    assert _ids(greedy) == _ids(engine.generate(PROMPTS, 8, temperature=1.3, top_k=1, seed=3, stop_at_eos=False))
    assert _ids(greedy) == _ids(engine.generate(PROMPTS, 8, temperature=1.0, top_p=1e-6, seed=3, stop_at_eos=False))


def test_sampler_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0]])
    probs = torch.softmax(logits[0], -1)
    counts = torch.zeros(5)
    sampler = Sampler(1.0, 0, 1.0, seed=0, rows=[0])
    for _ in range(4000):
        counts[sampler(logits)[0][0]] += 1
    assert torch.allclose(counts / 4000, probs, atol=0.03)
    # top_p = 0.8 keeps the smallest prefix reaching 0.8: tokens 0 and 1 (0.64 + 0.24 = 0.88)
    filtered = Sampler(1.0, 0, 0.8, seed=0, rows=[0])._filter(logits)
    assert torch.isfinite(filtered[0]).tolist() == [True, True, False, False, False]
    filtered = Sampler(1.0, 3, 1.0, seed=0, rows=[0])._filter(logits)
    assert torch.isfinite(filtered[0]).tolist() == [True, True, True, False, False]


def test_stop_sequences_of_any_length(engine):
    free = engine.generate(PROMPTS, 12, stop_at_eos=False).generations
    out = free[0].output_ids
    one, two = [out[3]], out[5:7]
    first_one = out.index(out[3])
    res = engine.generate(PROMPTS, 12, stop_token_sequences=[two, one], stop_at_eos=False).generations
    assert res[0].finish_reason == "stop"
    assert res[0].output_ids == out[:first_one]
    assert len(res[0].logprobs) == len(res[0].output_ids)
    res = engine.generate(PROMPTS[:1], 12, stop_token_sequences=[two], stop_at_eos=False).generations
    end = next(i for i in range(len(out)) if out[i:i + 2] == two)
    assert res[0].output_ids == out[:end] and res[0].finish_reason == "stop"


def test_eos_stops_a_row(tiny_opt, tmp_path):
    path, _ = tiny_opt("pre")
    free = Engine(path).generate(PROMPTS, 12, stop_at_eos=False).generations
    tok = free[1].output_ids[2]
    engine = Engine(tiny_models.with_eos(path, tmp_path / "eos", (tok,)))  # the same model, with that token as EOS
    assert engine.spec.eos_token_ids == (tok,)
    res = engine.generate(PROMPTS, 12).generations
    assert res[1].finish_reason == "eos"
    assert res[1].output_ids == free[1].output_ids[: free[1].output_ids.index(tok)]
