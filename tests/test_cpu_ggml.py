"""quant_kernels.cpu_ggml (the AVX2 int8-dot GEMM over GGML blocks) against the exact
``x @ gguf_ref.dequantize(W).T`` in float64.

Tolerance, from the kernel's arithmetic: the weights are used exactly and every block
product is an exact integer dot, so the error comes from rounding each activation to the
int8 grid of its 32-value block, at most half a step ``max|x_block| / 254`` per value.
Output n of row i is therefore within ``B = sum_b max|x_ib| / 254 * sum_{k in b} |W[n, k]|``
of the exact value; fp32 accumulation adds ~1e-6 relative.  Asserted: error <= 1.01 B + 1e-5
* sum_k |x_ik W[n, k]|.  The measured worst case is ~0.2 B (rounding errors have random
signs), while a layout bug (wrong nibble order, a lost fifth bit, a wrong offset) is off by
~100 B.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from quant_kernels import cpu_ext, cpu_ggml, gguf_ref

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason=f"CPU extension: {cpu_ext.status()[1]}")


def _weight(qtype: Q, n: int, k: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    # per-row scale spread plus an offset, so Q4_1/Q5_1's min and the zero points matter
    w = rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1)) + rng.uniform(-0.5, 0.5)
    return torch.from_numpy(gq.quantize(w.astype(np.float32), qtype))


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """Assert the bound above; return the worst error / bound ratio."""
    x, w = x.double(), w.double()
    m, k = x.shape
    step = x.reshape(m, k // 32, 32).abs().amax(-1) / 254            # [m, blocks]
    wsum = w.abs().reshape(w.shape[0], k // 32, 32).sum(-1)          # [n, blocks]
    bound = 1.01 * step @ wsum.T + 1e-5 * x.abs() @ w.abs().T
    err = (y.double() - x @ w.T).abs()
    ratio = (err / bound.clamp_min(1e-30)).max().item()
    assert ratio <= 1.0, f"error is {ratio:.3g}x the bound"
    return ratio


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k", [32, 96, 576])
@pytest.mark.parametrize("n", [1, 17, 23])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_dequantized_linear(qtype: Q, n: int, k: int, m: int) -> None:
    raw = _weight(qtype, n, k, seed=n * 1000 + k + int(qtype))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3
    y = cpu_ggml.matmul(x, raw, qtype)
    assert y.shape == (m, n) and y.dtype == torch.float32
    _check(y, x, gguf_ref.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_do_not_depend_on_the_batch(qtype: Q) -> None:
    """Each output row is bit-identical whether computed alone or with any other rows."""
    raw = _weight(qtype, 70, 160, seed=int(qtype))
    x = torch.randn(23, 160, generator=torch.Generator().manual_seed(5))
    full = cpu_ggml.matmul(x, raw, qtype)
    for rows in ([0], [22], [3, 4, 5], list(range(1, 18)), [17, 2, 9, 11, 0]):
        assert torch.equal(cpu_ggml.matmul(x[rows], raw, qtype), full[rows]), rows


def test_odd_activations():
    """Blocks of zeros (scale 0), one huge value, negative-only blocks; bf16 input."""
    raw = _weight(Q.Q4_1, 19, 128, seed=3)
    w = gguf_ref.dequantize(raw, Q.Q4_1)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(9))
    x[0, :32] = 0
    x[1] = 0
    x[2, 40] = 1e6
    x[3, 64:96] = -x[3, 64:96].abs()
    _check(cpu_ggml.matmul(x, raw, Q.Q4_1), x, w)
    assert torch.equal(cpu_ggml.matmul(x, raw, Q.Q4_1)[1], torch.zeros(19))
    # bf16 in and out: the same bound plus the output's bf16 rounding (2^-8 relative)
    xb = x.bfloat16()
    yb = cpu_ggml.matmul(xb, raw, Q.Q4_1)
    assert yb.dtype == torch.bfloat16
    exact = cpu_ggml.matmul(xb.float(), raw, Q.Q4_1)
    assert ((yb.float() - exact).abs() <= 2 ** -8 * exact.abs()).all()


def test_empty_batch_and_bad_shapes():
    raw = _weight(Q.Q8_0, 16, 64, seed=1)
    assert cpu_ggml.matmul(torch.zeros(0, 64), raw, Q.Q8_0).shape == (0, 16)
    with pytest.raises(RuntimeError, match="K=96"):
        cpu_ggml.matmul(torch.zeros(2, 96), raw, Q.Q8_0)
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        cpu_ggml.matmul(torch.zeros(2, 64), raw, Q.Q4_K)


def test_supports_reasons():
    assert cpu_ggml.supports(Q.Q4_1, 576, 576) == (True, "")
    ok, why = cpu_ggml.supports(Q.Q4_K, 576, 576)
    assert not ok and "Q4_K" in why and "Q8_0" in why
    ok, why = cpu_ggml.supports(Q.Q4_0, 16, 48)
    assert not ok and "multiple of 32" in why


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_do_not_change_results(threads):
    """The work-sharing pool (csrc/pool.h) splits output rows over threads; every output is
    computed by one thread in a fixed order, so results are bit-identical to one thread."""
    raw = _weight(Q.Q4_1, 1000, 576, seed=7)
    x = torch.randn(37, 576, generator=torch.Generator().manual_seed(8))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [cpu_ggml.matmul(x[:m], raw, Q.Q4_1) for m in (1, 37)]
        torch.set_num_threads(threads)
        for _ in range(20):  # many jobs through the same helpers
            many = [cpu_ggml.matmul(x[:m], raw, Q.Q4_1) for m in (1, 37)]
            assert all(torch.equal(a, b) for a, b in zip(one, many))
    finally:
        torch.set_num_threads(before)
