"""quant_kernels.triton_wq_gemv1 (the M == 1 packed-half kernel) and the 16 < M <= 64
swap path, against wq_reference.

On the CPU the kernel runs under TRITON_INTERPRET=1 with its PTX block replaced by the
same math in fp32 (``_word_dot_emulated``): these tests check the indexing, the sub-tiles,
masks, split-K and the dispatch.  The ``gpu`` tests run the PTX itself.

Tolerance (||out - ref|| / ||ref||): 2e-3 for fp16, 1e-2 for bf16 as in test_triton_wq.
On the GPU the weights, products and 4-term partial sums are rounded to the activation
dtype (measured on the H100: 4.9e-4 fp16, 3.9e-3 bf16 at 8192x8192); a nibble or pair
taken in the wrong order gives errors of order 1.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from quant_kernels import triton_wq as tw  # noqa: E402
from quant_kernels import triton_wq_gemv as gv  # noqa: E402
from quant_kernels import triton_wq_gemv1 as g1  # noqa: E402

from tests.test_triton_wq import TOL, make_weight, rel_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (K, group): every group size, partial last groups, per-channel with K not a power of two
KG = [(96, 32), (256, 64), (640, 128), (512, 256), (200, "K"), (100, 32), (130, 64)]


def run(x, w, config=None):
    out = torch.full((1, w.n), float("nan"), dtype=x.dtype, device=x.device)
    g1.gemv1(x, w, out, config=config)
    assert not torch.isnan(out).any(), "output elements left unwritten"
    return rel_err(out, tw.wq_reference(x, w))


@pytest.mark.parametrize("n", [1, 17, 23])
@pytest.mark.parametrize("k,g", KG)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_default_config(n, k, g, dtype):
    w = make_weight(n, k, g, 4, dtype=dtype, device=DEV, seed=n + k)
    x = torch.randn(1, k, dtype=dtype, device=DEV)
    assert run(x, w) < TOL[dtype]


# sub-tile width x sub-tiles per K tile x split x prefetch
CONFIGS = [g1._cfg1(16, 32, 4, 3, 4, 0), g1._cfg1(32, 32, 8, 1, 4, 1),
           g1._cfg1(16, 64, 2, 2, 4, 1), g1._cfg1(16, 128, 1, 4, 4, 0),
           g1._cfg1(64, 128, 2, 2, 4, 1)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "bk{BLOCK_K}-n{NSUB}-s{SPLIT_K}-p{PREFETCH}"
                         .format(**c.kwargs))
def test_pinned_configs(cfg):
    bk = cfg.kwargs["BLOCK_K"]
    for k, g in KG:
        w = make_weight(23, k, g, 4, device=DEV, seed=k)
        x = torch.randn(1, k, dtype=torch.float16, device=DEV)
        if g != "K" and g % bk and w.n_groups > 1:  # a sub-tile must sit inside one group
            with pytest.raises(ValueError, match=f"BLOCK_K={bk} spans several {g}-column"):
                run(x, w, cfg)
            continue
        assert run(x, w, cfg) < TOL[torch.float16], (k, g)
        # second launch: the split-K counters were left re-armed
        assert run(x, w, cfg) < TOL[torch.float16], (k, g)


def test_can_run_refusals(monkeypatch):
    w4 = make_weight(8, 64, 32, 4, device=DEV)
    ok, _ = g1.can_run(torch.randn(1, 64, dtype=torch.float16, device=DEV), w4)
    assert ok
    assert "one row" in g1.can_run(torch.randn(2, 64, dtype=torch.float16, device=DEV), w4)[1]
    w8 = make_weight(8, 64, 32, 8, device=DEV)
    assert "4-bit only" in g1.can_run(torch.randn(1, 64, dtype=torch.float16, device=DEV), w8)[1]
    odd = make_weight(8, 63, "K", 4, device=DEV)
    assert "odd K" in g1.can_run(torch.randn(1, 63, dtype=torch.float16, device=DEV), odd)[1]
    shifted = torch.randn(1, 65, dtype=torch.float16, device=DEV)[:, 1:]  # 2-byte offset
    assert "aligned" in g1.can_run(shifted, w4)[1]
    with pytest.raises(ValueError, match="aligned"):
        g1.gemv1(shifted, w4, torch.empty(1, 8, dtype=torch.float16, device=DEV))
    monkeypatch.setenv("QUANTRT_WQ_GEMV1", "0")
    assert "disabled" in g1.can_run(torch.randn(1, 64, dtype=torch.float16, device=DEV), w4)[1]


def test_dispatch_uses_gemv1_for_one_row(monkeypatch):
    calls = []
    real = g1.gemv1
    monkeypatch.setattr(g1, "gemv1", lambda *a, **k: calls.append(1) or real(*a, **k))
    # K = 320: the MMA kernel (K in multiples of 128) does not compete
    w = make_weight(17, 320, 64, 4, device=DEV)
    x = torch.randn(1, 320, dtype=torch.float16, device=DEV)
    assert rel_err(tw.wq_matmul(x, w), tw.wq_reference(x, w)) < TOL[torch.float16]
    # a misaligned row takes the generic decode kernel instead, with the same result
    xs = torch.randn(1, 321, dtype=torch.float16, device=DEV)[:, 1:]
    assert rel_err(tw.wq_matmul(xs, w), tw.wq_reference(xs, w)) < TOL[torch.float16]
    assert calls == [1]


@pytest.mark.parametrize("m", [17, 33, 64])
@pytest.mark.parametrize("k,g,bits", [(256, 128, 4), (96, 32, 8), (200, "K", 4)])
def test_swap_path(m, k, g, bits):
    w = make_weight(23, k, g, bits, device=DEV, seed=m)
    x = torch.randn(m, k, dtype=torch.float16, device=DEV)
    out = torch.full((m, 23), float("nan"), dtype=x.dtype, device=DEV)
    gv.swap(x, w, out)
    assert not torch.isnan(out).any()
    assert rel_err(out, tw.wq_reference(x, w)) < TOL[torch.float16]
    with pytest.raises(ValueError, match="16 < M"):
        gv.swap(x[:16], w, out[:16])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,g", [(4096, 4096, 128), (1000, 4096, 32), (4096, 14336, 128),
                                   (333, 1000, "K"), (28672, 4096, 128), (131, 576, 64)])
def test_gpu_autotuned(dtype, n, k, g):
    w = make_weight(n, k, g, 4, dtype=dtype, device="cuda", seed=n)
    x = torch.randn(1, k, dtype=dtype, device="cuda")
    assert run(x, w) < TOL[dtype]
    assert run(x, w) < TOL[dtype]  # the tuned config, launched directly


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", g1.GEMV1_CONFIGS, ids=lambda c: "n{BLOCK_N}-bk{BLOCK_K}-"
                         "x{NSUB}-s{SPLIT_K}-p{PREFETCH}".format(**c.kwargs))
def test_gpu_every_config(cfg):
    g = 32 if cfg.kwargs["BLOCK_K"] == 32 else 128
    w = make_weight(1100, 4096, g, 4, device="cuda", seed=3)
    x = torch.randn(1, 4096, dtype=torch.float16, device="cuda")
    assert run(x, w, cfg) < TOL[torch.float16]


@pytest.mark.gpu
def test_gpu_large_activations_do_not_overflow():
    # fp16 partial sums hold 4 products: |w x| up to ~16k each stays finite
    w = make_weight(256, 4096, 128, 4, device="cuda", seed=5)
    x = (torch.randn(1, 4096, device="cuda") * 3000).half()
    assert run(x, w) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 32, 40, 64])
def test_gpu_mid_m_choice(m):
    w = make_weight(4096, 4096, 128, 4, device="cuda", seed=m)
    x = torch.randn(m, 4096, dtype=torch.float16, device="cuda")
    assert rel_err(tw.wq_matmul(x, w), tw.wq_reference(x, w)) < TOL[torch.float16]
    assert any(v in ("swap", "gemm") for v in tw._CHOICE.values())


@pytest.mark.gpu
@pytest.mark.parametrize("m,g,bits", [(100, 128, 4), (256, 32, 4), (300, 32, 8)])
def test_gpu_gemm_or_dense_choice(m, g, bits):
    """64 < M < DEQUANT_GEMM_MIN_M: the fused GEMM (and on Hopper, for groups of 64+, the
    Gluon one) or dequantize + cuBLAS, whichever is faster, timed once; either way the
    result is right."""
    from quant_kernels import gluon_wq_gemm
    w = make_weight(4096, 4096, g, bits, device="cuda", seed=m)
    x = torch.randn(m, 4096, dtype=torch.float16, device="cuda")
    assert rel_err(tw.wq_matmul(x, w), tw.wq_reference(x, w)) < TOL[torch.float16]
    fns = ("gemm", "ws", "dense") if gluon_wq_gemm.can_run(x, w)[0] else ("gemm", "dense")
    assert any(k[0] == fns for k in tw._CHOICE)


# K tiles of 128 spanning several groups of 32/64 (WIDE: a scale per packed word), in the
# decode kernel's FMA and tl.dot paths, the swap kernel and the fused GEMM
@pytest.mark.parametrize("m", [1, 5, 17, 40, 70])
@pytest.mark.parametrize("k,g,bits", [(256, 32, 4), (300, 64, 4), (200, 32, 8), (384, 64, 8)])
def test_wide_tiles(m, k, g, bits):
    from quant_kernels import triton_wq_gemm as gm

    w = make_weight(23, k, g, bits, device=DEV, seed=m + k)
    x = torch.randn(m, k, dtype=torch.float16, device=DEV)
    out = torch.full((m, 23), float("nan"), dtype=x.dtype, device=DEV)
    if m <= 16:
        gv.gemv(x, w, out, config=gv._cfg(1 if m == 1 else 16, 32, 128, 2, wide=True))
    elif m <= 64:
        gv.run_config(x, w, out, gv._cfg(64, 32, 128, 2, wide=True))
    else:
        gm.gemm(x, w, out, config=gm._cfg(64, 32, 128, 2, wide=True))
    assert not torch.isnan(out).any()
    assert rel_err(out, tw.wq_reference(x, w)) < TOL[torch.float16]


def test_wide_configs_pruned_by_group():
    wide = [c for c in gv.GEMV_CONFIGS if c.kwargs["WIDE"]]
    args = dict(x_ptr=torch.empty(1), N=4096, K=4096, M_BUCKET=16)
    kept = gv._prune_gemv(gv.GEMV_CONFIGS, args, GROUP=32, BITS=4)
    assert any(c.kwargs["WIDE"] for c in kept)
    kept = gv._prune_gemv(gv.GEMV_CONFIGS, args, GROUP=128, BITS=4)
    assert kept and not any(c.kwargs["WIDE"] for c in kept)
    assert wide
