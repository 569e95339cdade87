"""Compressed weights: the fused int4 kernel agrees with dequantize-then-matmul, every placement of a
compressed model gives identical results, and compression stays close to the uncompressed model."""

from __future__ import annotations

import pytest
import torch

from runtime import Engine, Policy
from runtime.compressed import Int4Weight, WeightCodec, unpack_int4pack
from runtime.kernels import linear
from runtime.policy import QuantConfig
from runtime.quant import dequantize, quantize
from tests.runtime.test_offload import PLACEMENTS, PROMPTS

KERNEL = {"compress_weight": {"bits": 4, "group_size": 32}, "int4_dense_rows": 6}
"""Fits the kernel (the 64-wide model's K and N); prefill steps (>= 6 rows) dequantize, decode steps run the kernel."""
FALLBACK = {"compress_weight": {"bits": 3, "group_size": 16, "axis": "output"}}  # dequantized next to compute
CACHE = {"compress_cache": {"bits": 4, "group_size": 16}}  # head_dim 16
BOTH = {**KERNEL, **CACHE}
FORCED = [[40, 41, 42]] * len(PROMPTS)


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


@pytest.mark.parametrize("n", [64, 192, 80, 16, 208])  # whole 64-row tiles, and tails of N % 64 rows
def test_unpacking_the_kernel_form_gives_back_every_code(n):
    codes = torch.randint(0, 16, (n, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    assert torch.equal(unpack_int4pack(packed, 96).int(), codes)


@pytest.mark.parametrize("n", [208, 64, 16])
def test_large_steps_compute_in_fp32_on_the_kernels_own_weights(n):
    """The dense path (`Int4Weight.dense`: rows dequantized block by block, fp32 GEMM) computes with exactly the
    values the kernel form stores: equal to an fp32 product with `dequantize()` (fp32 summation-order tolerance,
    1e-5 relative); the kernel's own product of the same rows differs by its bf16 activations (< 1e-2)."""
    g = torch.Generator().manual_seed(n)
    w, x, b = torch.randn(n, 256, generator=g), torch.randn(300, 256, generator=g), torch.randn(n, generator=g)
    codec = WeightCodec(QuantConfig(bits=4, group_size=32), torch.device("cpu"), dense_rows=100)
    buf = codec.encode(w)
    scratch = torch.empty(64 * 256 + 7)  # one 64-row tile a block: several blocks, then the tail
    kw = codec.decode(buf, w.shape, scratch=scratch)
    exact = kw.dequantize()
    # the stored values are the group-wise 4-bit ones up to the kernel's bf16 steps
    torch.testing.assert_close(exact, dequantize(quantize(w, QuantConfig(bits=4, group_size=32))), atol=0.02, rtol=0)
    assert kw.dense(300) and not kw.dense(99) and not codec.decode(buf, w.shape).dense(300)
    got = linear(x, kw, b)
    ref = x @ exact.t() + b
    assert got.shape == (300, n)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    for rows in (99, 7):  # the kernel at fewer rows than dense_rows (and the skinny path of the same rows)
        small = linear(x[:rows], kw, b)
        assert ((small - ref[:rows]).norm() / ref[:rows].norm()).item() < 1e-2
    assert torch.equal(codec.values(buf, w.shape), exact)


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
