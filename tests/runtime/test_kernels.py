"""Shape-dispatched kernels agree with the plain op they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels import linear


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
