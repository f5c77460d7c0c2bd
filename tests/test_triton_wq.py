"""quant_kernels.triton_wq (fused dequant-matmul on WQWeight) against wq_reference.

On a CPU-only machine the Triton kernels run under TRITON_INTERPRET=1 (set here, before
Triton is imported); ``@pytest.mark.gpu`` tests run the compiled kernels on CUDA.

Tolerance: the kernels accumulate in fp32 like the oracle, so the differences are the
rounding of each dequantized weight to the activation dtype (dot paths) and of the
output: ||out - ref|| / ||ref|| < 2e-3 for fp16 activations (2^-11 per rounding;
measured <= 6.2e-4 here) and < 1e-2 for bf16 (2^-8; measured <= 7.1e-3 under the
interpreter, whose fp32->bf16 cast truncates instead of rounding to nearest).  A layout
bug (a nibble or group off by one) gives errors of order 1.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from quant_kernels import triton_wq as tw  # noqa: E402
from quant_kernels import triton_wq_gemm as gm  # noqa: E402
from quant_kernels import triton_wq_gemv as gv  # noqa: E402
from quant_kernels import triton_wq_gemv1 as g1  # noqa: E402
from quant_kernels.triton_wq import pack_wq, wq_matmul, wq_reference  # noqa: E402
from tests.ptx_interp import half_value, round16, run_ptx  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
CPU = "cpu"


def make_weight(n, k, group, bits, perm=False, dtype=torch.float16, device=CPU, seed=0):
    """Random non-zero weight: AWQ-style (q - z) * s, i.e. bias = -z * s."""
    g = torch.Generator().manual_seed(seed)
    gs = k if group == "K" else group
    gn = -(-k // gs)
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    s = (torch.rand(n, gn, generator=g) + 0.5) / (k ** 0.5 * (1 << bits))
    z = torch.randint(0, 1 << bits, (n, gn), generator=g).float() + torch.rand(n, gn, generator=g)
    p = torch.randperm(k, generator=g) if perm else None
    w = pack_wq(q, s, -z * s, gs, bits, perm=p, dtype=dtype)
    return w.to(device)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(x, w, out=None, **kw):
    """Run wq_matmul into a NaN-poisoned buffer; every element written and close."""
    poison = torch.full((*x.shape[:-1], w.n), float("nan"), dtype=x.dtype, device=x.device)
    y = wq_matmul(x, w, out=poison, **kw) if out is None else out(x, w, poison)
    assert y.shape == (*x.shape[:-1], w.n) and y.dtype == x.dtype
    assert not torch.isnan(poison).any(), "output elements left unwritten"
    ref = wq_reference(x, w)
    err = rel_err(poison, ref)
    assert err < TOL[x.dtype], f"relative error {err:.3g}"
    return err


# every (K, group) that fits, x bits x perm; (M, N) rotate over the small odd shapes
KG = [(32, 32), (32, "K"), (96, 32), (96, 64), (96, "K"), (100, 32), (100, 64), (100, "K"),
      (256, 32), (256, 64), (256, 128), (256, 256)]
MN = [(m, n) for m in (1, 3, 17, 33) for n in (1, 17, 23, 96)]
CASES = [(kg[0], kg[1], bits, perm) for kg in KG for bits in (4, 8) for perm in (False, True)]
CASES = [(*MN[i % len(MN)], *c) for i, c in enumerate(CASES)]


def _id(c):
    m, n, k, g, bits, perm = c
    return f"m{m}-n{n}-k{k}-g{g}-b{bits}" + ("-perm" if perm else "")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case):
    m, n, k, g, bits, perm = case
    w = make_weight(n, k, g, bits, perm, seed=CASES.index(case))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).half()
    check(x, w)
    # the functional custom-op path gives the same result as out=
    assert torch.equal(wq_matmul(x, w), wq_matmul(x, w, out=torch.empty(m, n).half()))


@pytest.mark.parametrize("m,n,k,g,bits,wdt", [(1, 23, 100, 32, 4, torch.bfloat16),
                                               (3, 17, 256, 128, 4, torch.float16),
                                               (17, 96, 96, "K", 8, torch.bfloat16),
                                               (5, 33, 64, 64, 8, torch.float16)])
def test_bf16_activations(m, n, k, g, bits, wdt):
    w = make_weight(n, k, g, bits, dtype=wdt, seed=7)
    check(torch.randn(m, k).bfloat16(), w)


def test_leading_dims_and_empty():
    w = make_weight(23, 96, 32, 4)
    check(torch.randn(2, 3, 96).half(), w)
    assert wq_matmul(torch.randn(0, 96).half(), w).shape == (0, 23)


# explicit configs: several N tiles with a ragged edge, uneven and empty K splits,
# the M tile swizzle, and both decode paths (FMA for M == 1, tl.dot otherwise)
@pytest.mark.parametrize("bm,split", [(1, 1), (1, 3), (16, 1), (16, 3)])
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_configs(bm, split, bits):
    m = 1 if bm == 1 else 5
    w = make_weight(23, 100, 32, bits, seed=bits)
    cfg = gv._cfg(bm, 16, 32, split)
    x = torch.randn(m, 100).half()
    check(x, w, out=lambda x, w, o: gv.gemv(x, w, o, config=cfg))


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("bits", [4, 8])
def test_gemm_configs(split, bits):
    w = make_weight(40, 100, 64, bits, seed=bits + 1)
    cfg = gm._cfg(16, 16, 32, split, gm=2)
    x = torch.randn(50, 100).half()
    check(x, w, out=lambda x, w, o: gm.gemm(x, w, o, config=cfg))


@pytest.mark.parametrize("path", ["gemv1", "gemv", "swap", "gemm"])
def test_pinned_tile_spanning_groups_is_refused(path):
    """A pinned config whose K tile spans scale groups would read one group's scale for
    all of them (the autotuners prune such tiles): refused, unless WIDE (a scale per
    word), which is right."""
    w = make_weight(17, 256, 32, 4, seed=5)
    m = {"gemv1": 1, "gemv": 5, "swap": 20, "gemm": 40}[path]
    x = torch.randn(m, 256).half()
    run = {"gemv1": lambda cfg, x, w, o: g1.gemv1(x, w, o, config=cfg),
           "gemv": lambda cfg, x, w, o: gv.gemv(x, w, o, config=cfg),
           "swap": lambda cfg, x, w, o: gv.run_config(x, w, o, cfg),
           "gemm": lambda cfg, x, w, o: gm.gemm(x, w, o, config=cfg)}[path]
    make = {"gemv1": lambda bk, wide: g1._cfg1(32, bk, 1, 1),
            "gemv": lambda bk, wide: gv._cfg(16, 32, bk, 1, wide=wide),
            "swap": lambda bk, wide: gv._cfg(32, 32, bk, 1, wide=wide),
            "gemm": lambda bk, wide: gm._cfg(32, 32, bk, wide=wide)}[path]
    out = torch.empty(m, 17).half()
    with pytest.raises(ValueError, match="BLOCK_K=64 spans several 32-column scale groups"):
        run(make(64, False), x, w, out)
    check(x, w, out=lambda x, w, o: run(make(32, False), x, w, o))
    if path != "gemv1":  # no WIDE mode there
        check(x, w, out=lambda x, w, o: run(make(64, True), x, w, o))


@pytest.mark.parametrize("g,bits,perm", [(32, 4, True), ("K", 8, False), (64, 4, False)])
def test_dequant_path(g, bits, perm):
    w = make_weight(23, 100, g, bits, perm)
    dense = gm.dequantize(w, torch.float16)
    assert dense.shape == (23, 100)
    assert rel_err(dense, tw.dequantize_wq(w)) < 1e-3
    check(torch.randn(7, 100).half(), w, out=lambda x, w, o: tw.dequant_matmul(x, w, o))


def test_pack_roundtrip_and_layout():
    q = torch.randint(0, 16, (5, 100))
    s, b = torch.rand(5, 4) + 0.1, torch.rand(5, 4)
    w = pack_wq(q, s, b, 32, 4)
    assert w.qweight.dtype == torch.int32 and w.qweight.shape == (5, 16)  # Kp = 128
    assert torch.equal(tw.unpack_q(w)[:, :100], q.int())
    assert not tw.unpack_q(w)[:, 100:].any()
    # LSB first: value k at bits 4 * (k % 8) of word k // 8
    assert int(w.qweight[0, 0]) & 0xF == int(q[0, 0])
    assert ((int(w.qweight[0, 0]) >> 4) & 0xF) == int(q[0, 1])
    assert w.scales.t().is_contiguous() and w.scales.shape == (5, 4)
    wt = tw.dequantize_wq(w)
    assert torch.allclose(wt[:, 40], q[:, 40] * w.scales[:, 1].float() + w.bias[:, 1].float())


@pytest.mark.parametrize("name,bits,kind", [("PTX_F16_U4", 4, "f16"), ("PTX_BF16_U4", 4, "bf16"),
                                            ("PTX_F16_U8", 8, "f16")])
def test_ptx_dequant_recipes(name, bits, kind):
    # the GPU fast path's bit logic (nibble order, magic numbers, selectors), checked on
    # the CPU; the GPU tests check the real instructions
    from quant_kernels import wq_layout
    asm, pack = getattr(wq_layout, name), 32 // bits
    rng = np.random.default_rng(bits)
    for _ in range(100):
        q = rng.integers(0, 1 << bits, (2, pack))
        sc = [round16(v, kind) for v in rng.uniform(1e-3, 0.1, 2)]
        bi = [round16(v, kind) for v in rng.uniform(-1, 1, 2)]
        regs = {f"${pack + i}": sum(int(v) << bits * j for j, v in enumerate(q[i]))
                for i in range(2)}
        regs[f"${pack + 2}"] = sc[0] | sc[1] << 16
        regs[f"${pack + 3}"] = bi[0] | bi[1] << 16
        regs = run_ptx(asm, regs)
        for p in range(pack):
            want = [round16(q[i, p] * half_value(sc[i], kind) + half_value(bi[i], kind), kind)
                    for i in range(2)]
            assert regs[f"${p}"] == want[0] | want[1] << 16, (p, q[:, p])


def test_perm_from_g_idx():
    g_idx = torch.tensor([1, 0, 1, 0, 2, 2])
    perm = tw.perm_from_g_idx(g_idx, 2)
    assert perm.tolist() == [1, 3, 0, 2, 4, 5]
    with pytest.raises(ValueError, match="groups of 2"):
        tw.perm_from_g_idx(torch.tensor([0, 0, 0, 1]), 2)


def _bad(**over):
    a = dict(q=torch.randint(0, 16, (4, 64)), scales=torch.ones(4, 2), bias=torch.zeros(4, 2),
             group_size=32, bits=4)
    a.update(over)
    return a


@pytest.mark.parametrize("over,match", [
    (dict(bits=3), "bits must be one of"),
    (dict(q=torch.randint(0, 16, (64,))), "2-D"),
    (dict(q=torch.rand(4, 64)), "integer tensor"),
    (dict(group_size=48), "group_size must be"),
    (dict(scales=torch.ones(4, 3)), r"scales must have shape \[N, ceil\(K/group\)\] = \[4, 2\]"),
    (dict(bias=torch.ones(2, 2)), "bias must have shape"),
    (dict(q=torch.full((4, 64), 16)), r"q values must lie in \[0, 16\)"),
    (dict(q=torch.full((4, 64), -1)), "q values must lie"),
    (dict(perm=torch.zeros(64, dtype=torch.int64)), "permutation"),
    (dict(perm=torch.arange(63)), "1-D tensor of K=64"),
    (dict(dtype=torch.float32), "float16 or bfloat16"),
])
def test_pack_rejects_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        pack_wq(**_bad(**over))


def test_matmul_rejects_bad_input():
    w = make_weight(8, 64, 32, 4)
    with pytest.raises(ValueError, match="K=64"):
        wq_matmul(torch.randn(2, 32).half(), w)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        wq_matmul(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="out must be"):
        wq_matmul(torch.randn(2, 64).half(), w, out=torch.empty(2, 9).half())


@pytest.mark.parametrize("m,n,k,g", [(1, 4096, 4096, 128), (4, 14336, 4096, 4096),
                                     (16, 4096, 14336, 32), (1, 128256, 4096, 64)])
def test_gemv_pruner(m, n, k, g):
    args = dict(x_ptr=torch.empty(1), N=n, K=k, GROUP=g, M_BUCKET=gv.m_bucket(m, 16))
    kept = gv._prune_gemv(gv.GEMV_CONFIGS, args)
    assert kept and len(kept) <= 10  # autotuning time per shape
    for c in kept:
        bm, bk, sk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        # a tile inside one group, or (WIDE) whole groups of one tile
        assert (bk % g == 0 and bk > g) if c.kwargs["WIDE"] else (g % bk == 0 or g == k)
        assert bm == 16 or m == 1
        assert sk == 1 or n <= gv.SPLITK_MAX_N
    assert any(c.kwargs["BLOCK_M"] == 1 for c in kept) == (m == 1)


@pytest.mark.parametrize("m,n,k,g", [(17, 4096, 4096, 128), (64, 8192, 8192, 128),
                                     (4096, 14336, 4096, 4096), (300, 4096, 4096, 32)])
def test_gemm_pruner(m, n, k, g):
    args = dict(x_ptr=torch.empty(1), N=n, K=k, GROUP=g, M_BUCKET=gv.m_bucket(m, 4096))
    kept = gm._prune_gemm(gm.GEMM_CONFIGS, args)
    assert kept and len(kept) <= 8
    for c in kept:
        bk = c.kwargs["BLOCK_K"]
        assert (bk % g == 0 and bk > g) if c.kwargs["WIDE"] else (g % bk == 0 or g == k)
        assert c.kwargs["BLOCK_M"] <= max(32, args["M_BUCKET"])


def test_fake_impl_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode
    w = make_weight(17, 96, 32, 4, perm=True)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(5, 96).half())
        fw = tw.WQWeight(*(mode.from_tensor(t) for t in (w.qweight, w.scales, w.bias, w.perm)),
                         w.k, w.group_size, w.bits)
        y = wq_matmul(fx, fw)
        assert y.shape == (5, 17) and y.dtype == torch.float16
    x = torch.randn(3, 96).half()
    args = (x, w.qweight, w.scales, w.bias, w.perm, w.k, w.group_size, w.bits)
    result = torch.library.opcheck(torch.ops.quantrt.wq_matmul.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    compiled = torch.compile(lambda x: wq_matmul(x, w) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), wq_matmul(x, w) * 2)


# ----------------------------------------------------------------------------- GPU
# Compiles dominate here: the small odd shapes use one pinned config per path, and the
# autotuned shapes are multiples of 16 like the benchmark's, so they share its binaries.
GPU_CASES = CASES[::6]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_id)
def test_gpu_small_shapes(case):
    m, n, k, g, bits, perm = case
    w = make_weight(n, k, g, bits, perm, device="cuda", seed=3)
    x = torch.randn(m, k, device="cuda").half()
    if m == 1:
        check(x, w, out=lambda x, w, o: gv.gemv(x, w, o, config=gv._cfg(1, 32, 32, 2)))
    if m <= 16:
        check(x, w, out=lambda x, w, o: gv.gemv(x, w, o, config=gv.SAFE_GEMV_CONFIG))
    else:
        check(x, w, out=lambda x, w, o: gm.gemm(x, w, o, config=gm.SAFE_GEMM_CONFIG))
    check(x, w, out=lambda x, w, o: tw.dequant_matmul(x, w, o))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bits,g,m", [
    *[(torch.float16, b, g, m) for b, g in ((4, 128), (8, "K"), (4, 32))
      for m in (1, 16, 64, 1024)],
    *[(torch.bfloat16, b, g, m) for b, g in ((4, 128), (8, "K")) for m in (1, 64)]])
def test_gpu_autotuned(dtype, bits, g, m):
    w = make_weight(1024, 4096, g, bits, device="cuda", seed=m)
    check(torch.randn(m, 4096, device="cuda", dtype=dtype), w)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_every_config(bits):
    # compile and check each config once (the autotuner silently skips a config that
    # fails in ptxas); per-channel K=1024 admits every BLOCK_K
    # (WIDE configs, whose tiles span groups, get groups of 32)
    w = make_weight(320, 1024, "K", bits, device="cuda")
    w32 = make_weight(320, 1024, 32, bits, device="cuda")
    for cfg in gv.GEMV_CONFIGS:
        m = 1 if cfg.kwargs["BLOCK_M"] == 1 else 11
        check(torch.randn(m, 1024, device="cuda").half(), w32 if cfg.kwargs["WIDE"] else w,
              out=lambda x, w, o: gv.gemv(x, w, o, config=cfg))
    for cfg in gv.SWAP_CONFIGS:
        check(torch.randn(40, 1024, device="cuda").half(), w32 if cfg.kwargs["WIDE"] else w,
              out=lambda x, w, o: gv.run_config(x, w, o, cfg))
    for cfg in gm.GEMM_CONFIGS:
        check(torch.randn(200, 1024, device="cuda").half(), w32 if cfg.kwargs["WIDE"] else w,
              out=lambda x, w, o: gm.gemm(x, w, o, config=cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_portable_dequant(bits, monkeypatch):
    # the fp32 unpack path (bf16 8-bit, or QUANTRT_WQ_FAST_DEQUANT=0) on the GPU
    monkeypatch.setattr(gv, "fast_dequant_ok", lambda dtype, b: False)
    monkeypatch.setattr(gm, "fast_dequant_ok", lambda dtype, b: False)
    w = make_weight(320, 1024, 128, bits, device="cuda")
    for m in (5, 100):
        check(torch.randn(m, 1024, device="cuda").half(), w)
    check(torch.randn(9, 1024, device="cuda").half(), w,
          out=lambda x, w, o: tw.dequant_matmul(x, w, o))


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    w = make_weight(512, 1024, 128, 4, perm=True, device="cuda")
    x = torch.randn(4, 1024, device="cuda").half()
    ref = wq_matmul(x, w)  # warm-up: autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = wq_matmul(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, wq_matmul(x, w)) and not torch.equal(y, ref)
    compiled = torch.compile(lambda x: wq_matmul(x, w) + 1, fullgraph=True)
    assert rel_err(compiled(x), wq_matmul(x, w) + 1) < 1e-3
