"""quant_kernels.int_ref: grouped integer and code-book references."""
import pytest
import torch

from quant_kernels.int_ref import (dequant_int, dequant_lut, linear_int_ref, linear_lut_ref,
                                   rtn_quantize)
from quantrt.errors import FormatError


def _naive(q, scales, zeros, g_idx):
    k, n = q.shape
    w = torch.empty(n, k, dtype=torch.float64)
    for kk in range(k):  # loops are fine in the test oracle
        g = int(g_idx[kk])
        z = zeros[g].double() if zeros is not None else 0
        w[:, kk] = (q[kk].double() - z) * scales[g].double()
    return w


@pytest.mark.parametrize("zeros_kind", ["int", "float", "none"])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequant_int_matches_naive(zeros_kind, act_order):
    gen = torch.Generator().manual_seed(0)
    k, n, g = 100, 23, 32  # partial last group
    n_groups = -(-k // g)
    g_idx = torch.arange(k) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    scales = torch.rand(n_groups, n, generator=gen)
    zeros = {"int": torch.randint(0, 16, (n_groups, n), generator=gen, dtype=torch.int32),
             "float": torch.rand(n_groups, n, generator=gen) * 15, "none": None}[zeros_kind]
    w = dequant_int(q, scales, zeros, g_idx.int(), dtype=torch.float64,
                    compute_dtype=torch.float64)
    assert w.shape == (n, k) and torch.allclose(w, _naive(q, scales, zeros, g_idx))
    if not act_order:  # group_size gives the same grouping as k // g
        assert torch.equal(dequant_int(q, scales, zeros, group_size=g),
                           dequant_int(q, scales, zeros, g_idx.int()))
    x = torch.randn(3, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    ref = x @ dequant_int(q, scales, zeros, g_idx.int()).t() + bias
    assert torch.allclose(linear_int_ref(x, q, scales, zeros, g_idx.int(), bias), ref)


def test_fp16_exactness_with_int_zeros():
    # float32 product then one cast == fp16 arithmetic, for int zeros
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, (64, 8), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 256, (1, 8), generator=gen, dtype=torch.int32)
    s = (torch.rand(1, 8, generator=gen) * 0.1).half()
    w = dequant_int(q, s, z, group_size=-1, dtype=torch.float16)
    assert torch.equal(w, ((q - z).half() * s).t())


def test_rtn_quantize_reconstructs():
    w = torch.randn(24, 130)
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            for gs in (32, -1):
                q, s, z = rtn_quantize(w, bits, gs, sym)
                assert q.min() >= 0 and q.max() < (1 << bits)
                back = dequant_int(q, s, z, group_size=gs)
                step = s.max()
                clip = step * (1 if sym else 0.51)  # sym clips the positive edge by a step
                assert (back - w).abs().max() <= clip + 1e-5


def test_dequant_lut_and_linear():
    code = torch.linspace(-1, 1, 16)
    idx = torch.randint(0, 16, (23 * 17,), dtype=torch.uint8)
    absmax = torch.rand(-(-23 * 17 // 64))
    w = dequant_lut(idx, code, absmax, 64, (23, 17))
    blk = torch.arange(23 * 17) // 64
    assert torch.equal(w.reshape(-1), code[idx.long()] * absmax[blk])
    x = torch.randn(2, 17)
    assert torch.allclose(linear_lut_ref(x, idx, code, absmax, 64, (23, 17)), x @ w.t())


def test_malformed_inputs():
    q = torch.zeros(64, 8, dtype=torch.int32)
    with pytest.raises(FormatError, match="columns"):
        dequant_int(q, torch.ones(2, 7))
    with pytest.raises(FormatError, match="zeros"):
        dequant_int(q, torch.ones(2, 8), torch.zeros(3, 8))
    with pytest.raises(FormatError, match="g_idx"):
        dequant_int(q, torch.ones(2, 8), g_idx=torch.zeros(10, dtype=torch.int32))
    with pytest.raises(FormatError, match="neither g_idx nor group_size"):
        dequant_int(q, torch.ones(2, 8))
    with pytest.raises(FormatError, match="group index"):
        dequant_int(q, torch.ones(2, 8), group_size=16)
    with pytest.raises(FormatError, match="absmax"):
        dequant_lut(torch.zeros(100, dtype=torch.uint8), torch.ones(16), torch.ones(3), 64,
                    (10, 10))
