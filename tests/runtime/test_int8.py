"""`compute: int8`: the int8 GEMM equals its fp64 emulation, the stored form round-trips at any alignment, every
placement gives the same results, and a model computed in int8 stays close to its exact logits."""

from __future__ import annotations

import pytest
import torch

from runtime import Engine, Policy
from runtime.compressed import weight_codec
from runtime.errors import PolicyError
from runtime.int8 import Int8Codec, Int8Weight, _int_mm_fp32, int_mm, quantize_rows
from runtime.kernels import linear
from runtime.policy import QuantConfig, int8_nbytes
from tests.runtime.test_compression import FORCED
from tests.runtime.test_offload import PLACEMENTS, PROMPTS

INT8 = {"compute": "int8"}


@pytest.mark.parametrize("m", [1, 5, 64, 300])
def test_int8_product_equals_its_emulation(m):
    """(x_q s_x)(w_q s_w)^T computed in int32 then scaled equals the same product in fp64 up to fp32 scaling
    (1e-6 relative), and stays within int8 rounding (~1%) of the exact fp32 product."""
    g = torch.Generator().manual_seed(m)
    w, x, b = torch.randn(96, 200, generator=g), torch.randn(m, 200, generator=g), torch.randn(96, generator=g)
    codec = Int8Codec(torch.device("cpu"))
    kw = codec.decode(codec.encode(w), w.shape)
    assert isinstance(kw, Int8Weight) and kw.shape == (96, 200)
    got = linear(x, kw, b)
    xq, sx = quantize_rows(x)
    emulated = (xq.double() * sx.double()) @ kw.dequantize().double().t() + b.double()
    assert got.shape == (m, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), emulated, rtol=1e-6, atol=1e-5)
    exact = x @ w.t() + b
    assert ((got - exact).norm() / exact.norm()).item() < 2e-2
    assert torch.equal(linear(x.view(1, m, 200), kw, b).view(m, 96), got)  # leading dims are rows


@pytest.mark.parametrize("k", [7, 1024, 2500])
def test_int8_gemm_is_exact_on_either_kernel(k):
    """torch's int8 GEMM and its fp32 stand-in (CPUs without a fast int8 kernel) give the exact integer product,
    codes at the extremes included (the fp32 one sums K in chunks whose sums fp32 holds exactly)."""
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (9, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, 33), generator=g, dtype=torch.int8)
    a[0], b[:, 0] = 127, -127  # the largest sum a row can reach
    exact = (a.long() @ b.long()).to(torch.int32)
    assert torch.equal(_int_mm_fp32(a, b), exact)
    assert torch.equal(_int_mm_fp32(a, b.t().contiguous().t()), exact)  # the codes' transposed view
    assert torch.equal(int_mm(a, b), exact)
    assert torch.equal(torch._int_mm(a, b), exact)


def test_stored_form_round_trips_at_any_offset():
    """Codes then fp32 scales in `int8_nbytes`; decoded views equal the quantization wherever the buffer lies
    (staged weights sit at their file offset, not always 4-byte aligned)."""
    w = torch.randn(10, 7)
    codec = Int8Codec(torch.device("cpu"))
    buf = codec.encode(w)
    assert buf.dtype == torch.uint8 and buf.numel() == int8_nbytes((10, 7)) == 128 + 40
    codes, scales = quantize_rows(w)
    assert codes.abs().max() == 127
    for offset in (0, 1, 3):
        shifted = torch.empty(buf.numel() + offset, dtype=torch.uint8)[offset:]
        shifted.copy_(buf)
        kw = codec.decode(shifted, (10, 7))
        assert torch.equal(kw.codes, codes) and torch.equal(kw.scales, scales[:, 0])
    torch.testing.assert_close(codec.values(buf, (10, 7)), w, atol=w.abs().max().item() / 254, rtol=0)
    assert torch.equal(quantize_rows(torch.zeros(2, 4))[0], torch.zeros(2, 4, dtype=torch.int8))


def test_int8_policy_errors():
    with pytest.raises(PolicyError, match="compute must be one of"):
        Policy(compute="int4")
    with pytest.raises(PolicyError, match="does not combine"):
        Policy(compute="int8", compress_weight={"bits": 4})
    with pytest.raises(PolicyError, match="runs on the CPU"):
        weight_codec(None, "int8", torch.device("cuda"))
    assert weight_codec(QuantConfig(bits=4), "exact", torch.device("cpu")).identity()["compress"]["bits"] == 4
    assert weight_codec(None, "exact", torch.device("cpu")) is None
    assert Policy.from_json(Policy(**INT8).to_json()).compute == "int8"


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_placement_of_an_int8_model_gives_identical_results(model64, tmp_path, placement):
    ref = Engine(model64, Policy(gpu_batch_size=2, **INT8))
    expected = ref.trace_logits(PROMPTS, FORCED)
    engine = Engine(model64, Policy(gpu_batch_size=2, num_gpu_batches=3, **INT8, **PLACEMENTS[placement]),
                    offload_dir=tmp_path)
    for a, b in zip(expected, engine.trace_logits(PROMPTS, FORCED)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    gens = engine.generate(PROMPTS, 6, stop_at_eos=False).generations
    assert [g.output_ids for g in gens] == [g.output_ids for g in ref.generate(PROMPTS, 6, stop_at_eos=False)
                                            .generations]
    engine.close()


def test_int8_logits_stay_close_and_weights_shrink(model64, tiny_llama):
    """Random tiny models: int8 compute within cosine 0.999 of the exact logits (measured ~0.9999); decoder
    matrices take a quarter of their fp32 bytes (the embedding stays as stored)."""
    for path in (model64, tiny_llama("llama-gqa")[0]):
        plain = Engine(path, Policy())
        int8 = Engine(path, Policy(**INT8))
        expected = torch.cat([t.flatten() for t in plain.trace_logits(PROMPTS, FORCED)])
        got = torch.cat([t.flatten() for t in int8.trace_logits(PROMPTS, FORCED)])
        cos = torch.nn.functional.cosine_similarity(got, expected, dim=0).item()
        assert 0.999 <= cos < 1.0, (path, cos)
        assert int8.weights.nbytes < 0.5 * plain.weights.nbytes  # measured 0.39-0.43
