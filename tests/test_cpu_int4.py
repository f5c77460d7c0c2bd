"""quant_kernels.cpu_int4 against the exact path ``x.float() @ gguf_ref.dequantize(w).T``.

Tolerance: the int4 path rounds activations, scales (and Q4_1's m + 8d) to bf16, a
relative error of at most 2^-9 ~ 0.2% on each term x[k] * W[n, k]; those errors have
random signs, so their sum scales with ``sqrt(sum_k (x[k] W[n, k])^2)`` (the output's
natural scale: what a random-sign sum of those terms is typically worth), not with
the output itself, which can cancel to ~0.  The output is then rounded to bf16 (2^-9
relative).  Each output must be within 2e-2 * (that scale + |reference|): the worst
case measured over this file is ~0.43 of that tolerance (typical ~0.1), while a
layout bug (e.g. the two nibble halves of a block swapped) is off by ~100x it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from quant_kernels import cpu_int4, gguf_ref
from quantrt.errors import FormatError, UnsupportedError

REL_TOL = 2e-2
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]

pytestmark = pytest.mark.skipif(not cpu_int4.supports(Q.Q4_0, 16, 32)[0],
                                reason="this torch has no int4 CPU matmul ops")


def _weight(qtype: Q, n: int, k: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    # per-row scale spread plus an offset, so Q4_1's min and the zero points matter
    w = rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1)) + rng.uniform(-0.5, 0.5)
    return torch.from_numpy(gq.quantize(w.astype(np.float32), qtype))


def _check(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    """Assert the tolerance above; return the worst error / tolerance ratio."""
    x = x.float()
    ref = x @ weight.T
    scale = ((x * x) @ (weight * weight).T).sqrt() + ref.abs()
    ratio = ((y.float() - ref).abs() / (REL_TOL * scale).clamp_min(1e-30)).max().item()
    assert ratio <= 1.0, f"error is {ratio:.3g}x the tolerance"
    return ratio


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k", [32, 96, 576])
@pytest.mark.parametrize("n", [1, 17, 23, 48, 192])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_dequantized_linear(qtype: Q, n: int, k: int, m: int) -> None:
    raw = _weight(qtype, n, k, seed=n * 1000 + k + int(qtype))
    w = cpu_int4.prepare(raw, qtype)
    assert (w.n, w.k, w.ggml_type) == (n, k, int(qtype))
    assert w.n_padded % 16 == 0 and len(w.packed) == (2 if qtype == Q.Q8_0 else 1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
    y = cpu_int4.matmul(x, w)
    assert y.shape == (m, n) and y.dtype == torch.float32
    _check(y, x, gguf_ref.dequantize(raw, qtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_leading_dims_and_dtypes(dtype: torch.dtype) -> None:
    raw = _weight(Q.Q4_1, 40, 64, seed=1)
    w = cpu_int4.prepare(raw, Q.Q4_1)
    x = torch.randn(2, 3, 64).to(dtype)
    y = cpu_int4.matmul(x, w)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    _check(y, x, gguf_ref.dequantize(raw, Q.Q4_1))
    assert cpu_int4.matmul(x[:, :0], w).shape == (2, 0, 40)


def test_q8_0_extreme_values() -> None:
    # -128 and 127 are the edges of the high/low nibble split (h = -8 / h = 7)
    raw = _weight(Q.Q8_0, 16, 64, seed=2).clone()
    blocks = raw.view(16, 2, 34)
    blocks[:, 0, 2:18] = torch.tensor(-128, dtype=torch.int8).view(torch.uint8)
    blocks[:, 1, 2:18] = 127
    w = cpu_int4.prepare(raw, Q.Q8_0)
    x = torch.randn(4, 64)
    _check(cpu_int4.matmul(x, w), x, gguf_ref.dequantize(raw, Q.Q8_0))


def test_supports_and_errors() -> None:
    assert cpu_int4.supports(Q.Q4_0, 17, 576) == (True, "")
    ok, why = cpu_int4.supports(Q.Q4_K, 16, 256)
    assert not ok and "Q4_K" in why
    ok, why = cpu_int4.supports(Q.Q8_0, 16, 48)
    assert not ok and "K=48" in why
    with pytest.raises(UnsupportedError, match="Q6_K"):
        cpu_int4.prepare(torch.zeros(16, 210, dtype=torch.uint8), Q.Q6_K)
    with pytest.raises(FormatError):
        cpu_int4.prepare(torch.zeros(16, 19, dtype=torch.uint8), Q.Q4_0)
    w = cpu_int4.prepare(_weight(Q.Q4_0, 16, 64, seed=3), Q.Q4_0)
    with pytest.raises(ValueError, match="K=32"):
        cpu_int4.matmul(torch.randn(1, 32), w)
