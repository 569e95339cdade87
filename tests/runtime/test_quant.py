"""Group-wise quantization: packing, error bounds, SNR, the search method, layouts."""

from __future__ import annotations

import pytest
import torch

from runtime.errors import PolicyError
from runtime.policy import QuantConfig
from runtime.quant import dequantize, layout_of, pack, quantize, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 64), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_four_bit_packs_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0xF7]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("transpose", [False, True])
def test_error_within_half_a_step(bits, transpose):
    x = torch.randn(24, 200, generator=torch.Generator().manual_seed(0)) * 3  # 200: a padded last group
    cfg = QuantConfig(bits=bits, group_size=64)
    q = quantize(x, cfg, transpose=transpose)
    y = dequantize(q)
    assert y.shape == x.shape
    lay = q.layout
    step = q.scale.float().repeat_interleave(64, 1)[:, :lay.cols]  # (rows, cols)
    err = (y.t() - x.t()).abs() if transpose else (y - x).abs()
    assert torch.all(err <= step.reshape(err.shape) / 2 * 1.001 + 1e-3 * step.reshape(err.shape))


def _snr_db(x, y):
    return 10 * torch.log10(x.square().sum() / (x - y).square().sum()).item()


def test_snr_of_4bit_gaussian_and_monotone_in_bits():
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    snr = {b: _snr_db(x, dequantize(quantize(x, QuantConfig(bits=b)))) for b in (2, 3, 4, 8)}
    assert snr[4] >= 18
    assert snr[2] < snr[3] < snr[4] < snr[8]


def test_search_lowers_error_on_heavy_tails():
    x = torch.distributions.StudentT(3.0).sample((256, 512))
    mm = _snr_db(x, dequantize(quantize(x, QuantConfig(bits=3))))
    se = _snr_db(x, dequantize(quantize(x, QuantConfig(bits=3, method="search"))))
    assert se > mm + 0.3


def test_four_bit_weights_take_under_0_3_of_fp16():
    lay = layout_of((2048, 2048), QuantConfig(bits=4, group_size=64))
    assert lay.nbytes <= 0.3 * 2048 * 2048 * 2


def test_quantize_into_a_given_buffer_and_constant_groups():
    x = torch.ones(4, 64) * 0.5
    cfg = QuantConfig()
    buf = torch.empty(layout_of((4, 64), cfg).nbytes, dtype=torch.uint8)
    q = quantize(x, cfg, out=buf)
    assert q.buffer.data_ptr() == buf.data_ptr()
    assert torch.equal(dequantize(q), x)


@pytest.mark.parametrize("kw", [{"bits": 5}, {"group_size": 12}, {"axis": "rows"}, {"method": "gptq"}])
def test_bad_configs_are_rejected(kw):
    with pytest.raises(PolicyError):
        QuantConfig(**kw)
    with pytest.raises(PolicyError, match="unknown compression keys"):
        QuantConfig.from_json({"bitz": 4})
