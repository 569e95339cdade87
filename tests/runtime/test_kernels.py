"""Shape-dispatched kernels agree with the plain op they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels import CastWeight, linear


@pytest.mark.parametrize("rows", [1, 2, 8, 33, 256, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear(rows, bias):
    torch.manual_seed(rows)
    x = torch.randn(rows, 1, 96)  # (B, T, K): decode-shaped
    w, b = torch.randn(160, 96), torch.randn(160) if bias else None
    got = linear(x, w, b)
    assert got.shape == (rows, 1, 160)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    got2 = linear(x.reshape(1, rows, 96), w, b)  # (B, T, K): prefill-shaped
    torch.testing.assert_close(got2, F.linear(x.reshape(1, rows, 96), w, b), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_cast_weight_converts_block_by_block_to_the_same_product(rows, bias):
    """A fp16 weight in three parts (a fused q/k/v) with a scratch of 7 rows: blocks cross no part boundary,
    the last block of each part is short, and the product equals the fp32 weight's."""
    torch.manual_seed(rows)
    parts = [torch.randn(n, 96).half() for n in (40, 40, 17)]
    full = torch.cat(parts).float()  # (97, 96)
    b = torch.randn(97) if bias else None
    w = CastWeight(tuple(parts), torch.empty(7 * 96 + 5))
    assert w.shape == (97, 96)
    starts = [start for start, _ in w.blocks()]
    assert starts == [0, 7, 14, 21, 28, 35, 40, 47, 54, 61, 68, 75, 80, 87, 94]
    for x in (torch.randn(rows, 1, 96), torch.randn(1, rows, 96)):  # decode- and prefill-shaped
        got = linear(x, w, b)
        assert got.shape == (*x.shape[:-1], 97) and got.is_contiguous()
        torch.testing.assert_close(got, linear(x, full, b), atol=1e-5, rtol=1e-6)
