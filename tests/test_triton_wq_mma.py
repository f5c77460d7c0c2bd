"""quant_kernels.triton_wq_mma (the M <= 16 tensor-core decode kernel) against wq_reference.

On the CPU the kernel runs under TRITON_INTERPRET=1 with its PTX (loads, unpack, mma.sync)
replaced by each lane's fragment values computed from plain loads: these tests check the
fragment indexing, the warps' K split, the per-slab scales, row/column masks and
``can_run``.  The ``gpu`` tests run the PTX itself, whose lane mapping a wrong nibble,
pair or fragment order would break with errors of order 1.

Tolerance (||out - ref|| / ||ref||): 2e-3 for fp16, 1e-2 for bf16 as in test_triton_wq
(the tensor cores sum exact products q * x in fp32; only the output is rounded).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from quant_kernels import triton_wq as tw  # noqa: E402
from quant_kernels import triton_wq_mma as mm  # noqa: E402

from tests.test_triton_wq import TOL, make_weight, rel_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run(x, w, config=None):
    out = torch.full((x.shape[0], w.n), float("nan"), dtype=x.dtype, device=x.device)
    mm.mma_matmul(x, w, out, config=config)
    assert not torch.isnan(out).any(), "output elements left unwritten"
    return rel_err(out, tw.wq_reference(x, w))


# (K, group): one and several slabs per group, per-channel, groups not dividing the warps,
# groups of 32 / 64 (the lane-scaled block: four / two groups per slab)
@pytest.mark.parametrize("k,g", [(128, 128), (384, 128), (512, 256), (256, "K"), (640, 128),
                                 (384, 32), (256, 64), (640, 64)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shapes(k, g, m, dtype):
    n = 23 if m % 2 else 17  # rows past N: clamped loads, masked stores
    w = make_weight(n, k, g, 4, dtype=dtype, device=DEV, seed=n + k + m)
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    assert run(x, w) < TOL[dtype]


# the loop variants: one slab per iteration with 1-3 in flight, scales loaded in the
# iteration that uses them; K of 5 and 9 slabs so that warps' runs end mid-flight
@pytest.mark.parametrize("knobs", [dict(pair=1, DEPTH=1), dict(pair=1, DEPTH=2),
                                   dict(pair=1, DEPTH=3), dict(pair=2, SCALES_AHEAD=0),
                                   dict(pair=1, DEPTH=3, SCALES_AHEAD=0)])
@pytest.mark.parametrize("k,g", [(640, 128), (1152, 64)])
@pytest.mark.parametrize("m", [1, 9])
def test_loop_variants(knobs, k, g, m):
    w = make_weight(17, k, g, 4, device=DEV, seed=k + m)
    x = torch.randn(m, k, dtype=torch.float16, device=DEV)
    knobs = dict(knobs)
    assert run(x, w, config=mm._cfg(2, knobs.pop("pair"), **knobs)) < TOL[torch.float16]


# 8-bit: 64-column slabs; groups of 32 (lane-scaled), 64 / 128 (slab-scaled), per-channel
@pytest.mark.parametrize("k,g", [(64, 32), (320, 32), (192, 64), (384, 128), (256, "K")])
@pytest.mark.parametrize("m", [1, 3, 9, 16])
def test_shapes_8bit(k, g, m):
    n = 23 if m % 2 else 17
    w = make_weight(n, k, g, 8, dtype=torch.float16, device=DEV, seed=n + k + m)
    x = torch.randn(m, k, dtype=torch.float16, device=DEV)
    assert run(x, w) < TOL[torch.float16]


@pytest.mark.parametrize("pair", [1, 2])
@pytest.mark.parametrize("warps", [1, 2, 4])
def test_warp_split(warps, pair):
    """More warps than slabs (idle warps add nothing), uneven splits, one or two slabs
    per iteration (an odd count leaves a half pair)."""
    w = make_weight(32, 640, 128, 4, device=DEV, seed=warps)
    x = torch.randn(5, 640, dtype=torch.float16, device=DEV)
    assert run(x, w, config=mm._cfg(warps, pair)) < TOL[torch.float16]


def test_can_run_reasons():
    x = torch.randn(1, 256, dtype=torch.float16, device=DEV)
    for g in (32, 64):
        assert mm.can_run(x, make_weight(16, 256, g, 4, device=DEV)) == (True, "")
    w = make_weight(16, 192, 64, 4, device=DEV)
    ok, why = mm.can_run(x[:, :192], w)
    assert not ok and "K=192" in why
    w = make_weight(16, 256, 128, 8, device=DEV)
    assert mm.can_run(x, w) == (True, "")
    w8 = make_weight(16, 256, 128, 8, dtype=torch.bfloat16, device=DEV)
    assert "bf16 cannot hold" in mm.can_run(x.bfloat16(), w8)[1]
    assert "K=96" in mm.can_run(x[:, :96], make_weight(16, 96, 32, 8, device=DEV))[1]
    w = make_weight(16, 256, 128, 4, device=DEV)
    assert mm.can_run(x, w) == (True, "")
    assert "1..16 rows" in mm.can_run(torch.randn(17, 256, dtype=torch.float16, device=DEV), w)[1]
    assert "alike" in mm.can_run(x.bfloat16(), w)[1]
    x2 = torch.randn(2, 264, dtype=torch.float16, device=DEV)[:, 4:260]  # 8-byte offset
    assert "16-byte aligned" in mm.can_run(x2, w)[1]
    with pytest.raises(ValueError, match="cannot take"):
        mm.mma_matmul(x2, w, torch.empty(2, 16, dtype=torch.float16, device=DEV))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's fallback choice")
def test_dispatch_takes_mma_where_it_can(monkeypatch):
    calls = []
    real = mm.mma_matmul
    monkeypatch.setattr(mm, "mma_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = make_weight(17, 256, 128, 4, device=DEV)
    for m in (1, 16):
        x = torch.randn(m, 256, dtype=torch.float16, device=DEV)
        assert rel_err(tw.wq_matmul(x, w), tw.wq_reference(x, w)) < TOL[torch.float16]
    assert calls == [1, 1]
    w = make_weight(17, 256, 64, 4, device=DEV)  # group 64: the lane-scaled block
    tw.wq_matmul(torch.randn(1, 256, dtype=torch.float16, device=DEV), w)
    assert calls == [1, 1, 1]
    w = make_weight(17, 192, 64, 4, device=DEV)  # K not a multiple of 128: the FMA kernels
    tw.wq_matmul(torch.randn(1, 192, dtype=torch.float16, device=DEV), w)
    assert calls == [1, 1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k,g", [(4096, 4096, 128), (1000, 2048, 256), (4104, 1024, "K"),
                                   (8192, 8192, 128), (4096, 4096, 32), (1000, 2048, 64)])
@pytest.mark.parametrize("m", [1, 2, 7, 8, 12, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_ptx(n, k, g, m, dtype):
    w = make_weight(n, k, g, 4, dtype=dtype, device=DEV, seed=m)
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    for cfg in mm.MMA_CONFIGS:
        assert run(x, w, config=cfg) < TOL[dtype]
    assert run(x, w) < TOL[dtype]  # autotuned


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k,g", [(4096, 4096, 32), (1000, 2048, "K"), (4104, 1024, 128),
                                   (4096, 14336, 32)])
@pytest.mark.parametrize("m", [1, 2, 8, 12, 16])
def test_gpu_ptx_8bit(n, k, g, m):
    dtype = torch.float16
    w = make_weight(n, k, g, 8, dtype=dtype, device=DEV, seed=m)
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    for cfg in mm.MMA_CONFIGS:
        assert run(x, w, config=cfg) < TOL[dtype]
    assert run(x, w) < TOL[dtype]  # autotuned


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_dispatch_choice(m):
    """wq_matmul times the MMA kernel against the FMA kernels once per shape and keeps
    the faster; either way the result is right."""
    w = make_weight(4096, 4096, 128, 4, device=DEV, seed=m)
    x = torch.randn(m, 4096, dtype=torch.float16, device=DEV)
    assert rel_err(tw.wq_matmul(x, w), tw.wq_reference(x, w)) < TOL[torch.float16]
    assert any(k[0] == ("mma", "fma") for k in tw._CHOICE)
