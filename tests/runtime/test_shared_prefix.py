"""A block's shared prompt prefix (a few-shot prompt's examples) is computed once and its keys and values go into
every row's cache: generation equals HF's per prompt and the same prompts run one per block (nothing shared), under
every placement and with 4-bit weights; a cache slot, plain or 4-bit, in memory or on disk, writes a one-row
step into every row; a sliding window turns sharing off.

Tolerance: 1e-4 max abs on log-probs against HF (as `test_llama.py`), 1e-5 against the engine's own unshared run
(the prefix's matmuls run on 1 row instead of the block's rows: another summation order, ~1e-7 seen).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime import Engine, Policy, batching
from runtime.compressed import KVCodec
from runtime.disk import DiskIO
from runtime.kv_cache import DiskKVSlot, KVSlot, StagingRing
from runtime.layers import StepContext
from runtime.policy import Placement, QuantConfig
from runtime.shapes import SHARED_PREFIX_MIN, prefix_computed_once
from tests.runtime.test_llama import _reset_rotary

PREFIX = [7 + (i * 13) % 250 for i in range(SHARED_PREFIX_MIN + 4)]
SUFFIXES = [[20, 21, 22], [30], [40, 41, 42, 43, 44, 45], [50, 51], [60, 61, 62, 63], [70, 71, 72]]
PROMPTS = [PREFIX + s for s in SUFFIXES]
NEW = 5
Q4 = QuantConfig(bits=4, group_size=16)
POLICIES = {
    "in memory, 2 micro-batches": Policy(gpu_batch_size=3, num_gpu_batches=2),
    "all on disk": Policy(gpu_batch_size=2, num_gpu_batches=3, weights=Placement(0, 0), cache=Placement(0, 0),
                          activations=Placement(0, 0)),
    "split, sequential": Policy(gpu_batch_size=3, num_gpu_batches=2, weights=Placement(0.4, 0.3),
                                cache=Placement(0.5, 0.2), activations=Placement(0.5, 0), overlap=False),
    "4-bit weights, cache on disk": Policy(gpu_batch_size=3, num_gpu_batches=2, cache=Placement(0, 0),
                                           compress_weight=Q4),
}
# A 4-bit cache is left out of the end-to-end comparison: its rounding turns the ~1e-7 differences of other matmul
# shapes into whole steps (as any other block composition does), so its shared and unshared runs differ by chance.
# What sharing does to it, writing the prefix's records into every row, is checked on the slots themselves (below).


def _unshared(policy: Policy) -> Policy:
    """The same policy with blocks of one prompt: nothing to share."""
    return dataclasses.replace(policy, gpu_batch_size=1, num_gpu_batches=1)


@pytest.mark.parametrize("model", ["opt", "llama-gqa", "llama-mqa-tied-headdim", "qwen2-bias"])
def test_a_shared_prefix_generates_as_hf(tiny_opt, tiny_llama, model):
    path, hf = tiny_opt() if model == "opt" else tiny_llama(model)
    result = Engine(path, Policy(gpu_batch_size=len(PROMPTS))).generate(PROMPTS, NEW, stop_at_eos=False)
    assert result.stats.shared_prefix_tokens == len(PREFIX) * (len(PROMPTS) - 1)
    for p, g in zip(PROMPTS, result.generations):
        if model != "opt":
            _reset_rotary(hf)
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        assert g.output_ids == out.sequences[0, len(p):].tolist()
        want = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, g.output_ids)]  # raw logits
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(want), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(POLICIES))
def test_sharing_changes_no_result_under_any_placement(tiny_llama, tmp_path, name):
    path, _ = tiny_llama("llama-gqa")
    policy = POLICIES[name]
    alone = Engine(path, _unshared(policy), offload_dir=tmp_path / "alone").generate(PROMPTS, NEW, stop_at_eos=False)
    assert alone.stats.shared_prefix_tokens == 0
    engine = Engine(path, policy, offload_dir=tmp_path / "shared")
    shared = engine.generate(PROMPTS, NEW, stop_at_eos=False)
    blocks = batching.plan_blocks([len(p) for p in PROMPTS], policy.block_size)
    assert shared.stats.shared_prefix_tokens == sum(len(PREFIX) * (len(b) - 1) for b in blocks)
    for a, s in zip(alone.generations, shared.generations):
        assert s.output_ids == a.output_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0)
    engine.close()


def test_a_sliding_window_shares_nothing_and_still_equals_hf(tiny_llama):
    path, hf = tiny_llama("mistral-window")
    result = Engine(path, Policy(gpu_batch_size=len(PROMPTS))).generate(PROMPTS, NEW, stop_at_eos=False)
    assert result.stats.shared_prefix_tokens == 0
    for p, g in zip(PROMPTS, result.generations):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              pad_token_id=0)[0, len(p):]
        assert g.output_ids == ref.tolist()


def test_shared_prefix_and_its_padding():
    assert batching.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert batching.shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every row keeps a token of its own
    assert batching.shared_prefix([[1, 2, 3, 4]]) == 0  # one row shares with nobody
    m = SHARED_PREFIX_MIN
    assert prefix_computed_once(m - 1, 100, 8, None, scoring=False) == 0  # too short to pay
    assert prefix_computed_once(m, 100, 8, None, scoring=False) == m
    assert prefix_computed_once(m, 100, 8, 107, scoring=False) == 0  # the window would see the pads' columns
    assert prefix_computed_once(m, 100, 8, 108, scoring=False) == m
    assert prefix_computed_once(49, 100, 0, None, scoring=True) == 0  # scoring: half the block's width or more
    assert prefix_computed_once(50, 100, 0, None, scoring=True) == 50
    ids, valid = batching.pad([[1, 2, 3, 4], [1, 2, 5, 6, 7]], 0, torch.device("cpu"), prefix=2)
    assert ids.tolist() == [[1, 2, 0, 3, 4], [1, 2, 5, 6, 7]]
    assert valid.tolist() == [[True, True, False, True, True], [True] * 5]
    assert batching.positions(valid).tolist() == [[0, 1, -1, 2, 3], [0, 1, 2, 3, 4]]


CONTINUATIONS = [[80, 81], [82], [83, 84, 85], [86], [87, 88], [89]]


@pytest.mark.parametrize("model", ["opt", "llama-gqa"])
def test_scoring_shares_a_prefix_and_equals_hf(tiny_opt, tiny_llama, model):
    path, hf = tiny_opt() if model == "opt" else tiny_llama(model)
    engine = Engine(path, Policy(gpu_batch_size=3, num_gpu_batches=2))
    result = engine.score(PROMPTS, CONTINUATIONS)
    assert result.stats.shared_prefix_tokens == len(PREFIX) * (len(PROMPTS) - 1)
    alone = Engine(path, Policy(gpu_batch_size=1)).score(PROMPTS, CONTINUATIONS)
    assert alone.stats.shared_prefix_tokens == 0
    for c, x, s, a in zip(PROMPTS, CONTINUATIONS, result.scores, alone.scores):
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([c + x])).logits[0].float(), -1)  # (T, V)
        want = [lp[len(c) - 1 + j, t].item() for j, t in enumerate(x)]
        torch.testing.assert_close(torch.tensor(s.token_logprobs), torch.tensor(want), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(s.token_logprobs), torch.tensor(a.token_logprobs), atol=1e-5, rtol=0)
        assert s.is_greedy == a.is_greedy


def test_scoring_shares_nothing_a_continuation_needs_or_a_short_prefix(tiny_opt):
    path, _ = tiny_opt()
    engine = Engine(path, Policy(gpu_batch_size=len(PROMPTS)))
    # contexts of one token: the prefix would hold scored columns
    assert engine.score([[5]] * 3, [PREFIX + [9], PREFIX + [8], PREFIX]).stats.shared_prefix_tokens == 0
    # a prefix under half of the block's width would cost the rows' masked attention more than it saves
    long = [PREFIX + [100 + k] * (3 * len(PREFIX)) for k in range(3)]
    assert engine.score(long, [[5]] * 3).stats.shared_prefix_tokens == 0


@pytest.mark.parametrize("codec", [None, KVCodec(Q4, 16)], ids=["plain", "4-bit"])
@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_a_one_row_step_fills_every_row_of_a_slot(tmp_path, codec, tier):
    B, kvh, S, D, P = 3, 2, 10, 16, 4
    width, dtype = (codec.record_bytes, torch.uint8) if codec else (D, torch.float32)
    io = DiskIO()
    if tier == "memory":
        slot = KVSlot(torch.zeros(B, kvh, S, width, dtype=dtype), torch.zeros(B, kvh, S, width, dtype=dtype),
                      torch.device("cpu"), codec=codec)
    else:
        path = tmp_path / "kv"
        path.write_bytes(b"\0" * (2 * B * kvh * S * width * dtype.itemsize))
        slot = DiskKVSlot((B, kvh, S, width), dtype, path, io, StagingRing(pin=False), torch.device("cpu"), False,
                          codec)
    g = torch.Generator().manual_seed(0)
    k, v, q = (torch.randn(1, n, P, D, generator=g) for n in (kvh, kvh, 4))  # the prefix: one row
    ctx = StepContext(torch.arange(P)[None], None, 0)
    one = slot.attend(q, k, v, ctx)  # (1, 4, P, D)
    # every row now holds the prefix: a step of all rows after it attends to the same keys in each row
    q2, k2, v2 = (torch.randn(B, n, 1, D, generator=g) for n in (4, kvh, kvh))
    q2[:] = q2[:1]
    k2[:] = k2[:1]
    v2[:] = v2[:1]
    slot.prefetch(P)
    rows = slot.attend(q2, k2, v2, StepContext(torch.full((B, 1), P), None, P))  # (B, 4, 1, D)
    for r in range(1, B):
        assert torch.equal(rows[r], rows[0])
    assert one.shape == (1, 4, P, D)
    slot.close()
    io.close()
