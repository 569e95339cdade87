"""Compressed weights: the fused int4 kernel agrees with dequantize-then-matmul, every placement of a
compressed model gives identical results, and compression stays close to the uncompressed model."""

from __future__ import annotations

import pytest
import torch

from runtime import Engine, Policy
from runtime.compressed import Int4Weight, WeightCodec
from runtime.policy import QuantConfig
from runtime.quant import dequantize, quantize
from tests import tiny_models
from tests.runtime.test_offload import PLACEMENTS, PROMPTS

KERNEL = {"compress_weight": {"bits": 4, "group_size": 32}}  # fits the kernel: the 64-wide model's K and N
FALLBACK = {"compress_weight": {"bits": 3, "group_size": 16, "axis": "output"}}  # dequantized next to compute
CACHE = {"compress_cache": {"bits": 4, "group_size": 16}}  # head_dim 16
BOTH = {**KERNEL, **CACHE}
FORCED = [[40, 41, 42]] * len(PROMPTS)


@pytest.fixture(scope="module")
def model64(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("opt-64")
    tiny_models.build_opt(out, tokenizer=tokenizer_dir, hidden_size=64, ffn_dim=128, num_attention_heads=4)
    return out


@pytest.mark.parametrize("m", [1, 7, 64])
def test_int4_kernel_agrees_with_dequantize_then_matmul(m):
    g = torch.Generator().manual_seed(m)
    w, x, b = torch.randn(96, 256, generator=g), torch.randn(m, 256, generator=g), torch.randn(96, generator=g)
    codec = WeightCodec(QuantConfig(bits=4, group_size=64), torch.device("cpu"))
    assert codec.uses_kernel(w.shape)
    kw = codec.decode(codec.encode(w), w.shape)
    assert isinstance(kw, Int4Weight)
    ref = x @ dequantize(quantize(w, QuantConfig(bits=4, group_size=64))).t() + b
    got = kw.matmul(x, b)
    assert got.shape == (m, 96) and got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2  # bf16 activations and scales


def test_codec_falls_back_where_the_kernel_does_not_apply():
    cpu = torch.device("cpu")
    assert not WeightCodec(QuantConfig(bits=4, group_size=64), cpu).uses_kernel((100, 256))  # N % 16
    assert not WeightCodec(QuantConfig(bits=3), cpu).uses_kernel((96, 256))
    assert not WeightCodec(QuantConfig(bits=4, axis="output"), cpu).uses_kernel((96, 256))
    w = torch.randn(100, 48)
    codec = WeightCodec(QuantConfig(bits=4, group_size=16), cpu)
    out = torch.empty(100, 48)
    got = codec.decode(codec.encode(w), w.shape, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, dequantize(quantize(w, QuantConfig(bits=4, group_size=16))))


@pytest.mark.parametrize("cfg", [KERNEL, FALLBACK, CACHE, BOTH], ids=["kernel", "fallback", "cache", "both"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_placement_of_a_compressed_model_gives_identical_results(model64, tmp_path, cfg, placement):
    ref = Engine(model64, Policy(gpu_batch_size=2, **cfg))
    expected = ref.trace_logits(PROMPTS, FORCED)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, **cfg, **PLACEMENTS[placement])
    engine = Engine(model64, policy, offload_dir=tmp_path)
    for a, b in zip(expected, engine.trace_logits(PROMPTS, FORCED)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    gens = engine.generate(PROMPTS, 6, stop_at_eos=False).generations
    expected_ids = [g.output_ids for g in ref.generate(PROMPTS, 6, stop_at_eos=False).generations]
    assert [g.output_ids for g in gens] == expected_ids
    engine.close()


def test_compressed_logits_stay_close_and_weights_shrink(model64, tmp_path):
    plain = Engine(model64, Policy(weights={"device": 0, "host": 1}))
    expected = torch.cat([t.flatten() for t in plain.trace_logits(PROMPTS, FORCED)])
    for bits, min_cos in ((8, 0.9999), (4, 0.97)):  # random weights: 4 bits measured 0.99
        for field in ("compress_weight", "compress_cache"):
            engine = Engine(model64, Policy(**{field: {"bits": bits, "group_size": 16}}))
            got = torch.cat([t.flatten() for t in engine.trace_logits(PROMPTS, FORCED)])
            cos = torch.nn.functional.cosine_similarity(got, expected, dim=0).item()
            assert cos >= min_cos, (field, bits, cos)
    # matrices at 4 bits, group 64, take under 0.3x of their fp16 bytes; embeddings stay as stored
    packed = Engine(model64, Policy(compress_weight={"bits": 4, "group_size": 64})).weights
    matrices = [s for s in packed._all if s.packed]
    assert matrices and all(s.packed <= 0.3 * torch.Size(s.shape).numel() * 2 for s in matrices)


def test_policy_json_round_trip_with_compression():
    p = Policy(compress_weight={"bits": 4}, compress_cache=QuantConfig(bits=4, group_size=32))
    again = Policy.from_json(p.to_json())
    assert again == p and again.compress_weight == QuantConfig(bits=4)
