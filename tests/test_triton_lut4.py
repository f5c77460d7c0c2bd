"""quant_kernels.triton_lut4 (fused NF4/FP4 code-book dequant-matmul) against its torch
oracle, and the kernel class that runs it for bitsandbytes layers
(quantrt.quant.lut_kernels.TritonLut4Kernel).

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set here, before Triton is
imported); ``@pytest.mark.gpu`` tests run the compiled kernels on CUDA.

Oracle: ``x.float() @ W.T`` in fp32 with W rounded as bitsandbytes rounds it (fp32
``code * absmax`` -> the weight's own dtype -> x's dtype), then cast to x's dtype.  The
kernels round every weight the same way, accumulate in fp32 and round the output once,
so only the summation order differs: ||out - ref|| / ||ref|| < 1e-3 for fp16 (2^-11 per
output).  The interpreter's fp32 -> bf16 cast truncates where torch rounds to nearest,
so under the interpreter the oracle truncates too (weights and output) and the bound is
2e-3 for bf16 (a sum next to a bf16 boundary may truncate to the neighbour: 2^-8 on
that element); measured 0 for both dtypes on every case here.  Compiled on the GPU: the
plain oracle, and 8e-3 for bf16 (2^-8 rounding of the output, ~2e-3 measured for the
integer kernels).  A
layout bug (a nibble, row, absmax block or K tile off by one) gives errors of 1e-1 and
more.
"""
from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from formats import bnb as bnb_format  # noqa: E402
from quant_kernels import triton_lut4 as t4  # noqa: E402
from quant_kernels import triton_lut4_kernels as k4  # noqa: E402
from quant_kernels.triton_lut4 import lut4_matmul, pack_lut4  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TOL = {torch.float16: 1e-3, torch.bfloat16: 2e-3 if INTERPRET else 8e-3}
CPU = "cpu"


def make_weight(n, k, quant_type="nf4", bs=64, wdtype=torch.float16, device=CPU, seed=0):
    """A Lut4Weight of a random W (rows of different scales) quantized like bitsandbytes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) + 0.2)
    sd = bnb_format.quantize_4bit(w.to(wdtype), quant_type, bs)
    return pack_lut4(sd["weight"].to(device), sd["weight.absmax"].to(device),
                     sd["weight.quant_map"].to(device), bs, (n, k), wdtype)


def _trunc_bf16(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounding toward zero (what the interpreter's cast does)."""
    bits = t.float().contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def _to(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A cast as the kernels make it: to bf16 the interpreter truncates, torch rounds."""
    return _trunc_bf16(v) if INTERPRET and dtype == torch.bfloat16 else v.to(dtype)


def oracle_weight(w, dtype: torch.dtype) -> torch.Tensor:
    """W in ``dtype`` as the kernels round it: the fp32 product, to the weight's own dtype,
    to ``dtype`` (torch.Tensor.to on the GPU, where both round to nearest)."""
    if not INTERPRET:
        return t4.dequantize_lut4_ref(w, dtype)
    v = t4.dequantize_lut4_ref(dataclasses.replace(w, wdtype=torch.float32))  # unrounded
    return _to(_to(v, w.wdtype).float(), dtype)


def expected(x: torch.Tensor, w, torch_cast: bool = False) -> torch.Tensor:
    """``torch_cast``: the output is cast by torch (the dequant + matmul path), not by an
    interpreted kernel."""
    if not INTERPRET:
        return t4.lut4_reference(x, w)
    y = x.float() @ oracle_weight(w, x.dtype).float().t()
    return y.to(x.dtype) if torch_cast else _to(y, x.dtype)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(x, w, run=None, torch_cast=False):
    """Run into a NaN-poisoned buffer: every element written, close to the oracle."""
    poison = torch.full((*x.shape[:-1], w.n), float("nan"), dtype=x.dtype, device=x.device)
    y = lut4_matmul(x, w, out=poison) if run is None else run(x, w, poison)
    assert y.shape == (*x.shape[:-1], w.n) and y.dtype == x.dtype
    assert not torch.isnan(poison).any(), "output elements left unwritten"
    err = rel_err(poison, expected(x, w, torch_cast))
    assert err < TOL[x.dtype], f"relative error {err:.3g}"
    return err


# every code book x block size x activation dtype; (M, N) and the weight's own dtype
# rotate over odd shapes (M 1: FMA path, 3: tensor cores, 17: dispatched to the expansion
# + matmul, and the fused kernel's M tile of 32 called directly; N 23 and
# 49: one ragged N tile, two tiles); K = 3 blocks (2 for 256), an odd number of K tiles
MN = [(1, 23), (3, 49), (17, 23), (1, 49), (3, 23), (17, 49)]
WDTYPES = [torch.float16, torch.bfloat16, torch.float32]
CASES = [(qt, bs, dt) for qt in ("nf4", "fp4") for bs in (32, 64, 128, 256)
         for dt in (torch.float16, torch.bfloat16)]
CASES = [(*MN[i % len(MN)], *c, WDTYPES[i % 3]) for i, c in enumerate(CASES)]


def _id(c):
    m, n, qt, bs, dt, wdt = c
    return f"m{m}-n{n}-{qt}-bs{bs}-{str(dt)[6:]}-w{str(wdt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case):
    m, n, qt, bs, dtype, wdtype = case
    k = bs * (3 if bs < 256 else 2)
    w = make_weight(n, k, qt, bs, wdtype, seed=CASES.index(case))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(dtype)
    dense = m >= t4.DEQUANT_GEMM_MIN_M  # dispatched to the expansion + matmul
    check(x, w, torch_cast=dense)
    if m > t4.DECODE_MAX_M:  # the fused kernel's M tiles, called directly
        check(x, w, run=lambda x, w, o: k4.fused(x, w, o))
    # the functional path gives what out= gives
    assert torch.equal(lut4_matmul(x, w), lut4_matmul(x, w, out=torch.empty(m, n, dtype=dtype)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("wdtype", WDTYPES)
def test_layout_is_bitsandbytes_dequantization(quant_type, wdtype):
    """The oracle's weight is the format reference's (bitsandbytes' dequantize_4bit, checked
    against the library in test_formats_bnb), bit for bit, double quant included."""
    w = torch.randn(17, 128).to(wdtype)
    sd = bnb_format.quantize_4bit(w, quant_type, 64, double_quant=True)
    absmax = bnb_format.dequantize_absmax(sd["weight.absmax"], sd["weight.nested_absmax"],
                                          sd["weight.nested_quant_map"],
                                          bnb_format.parse_quant_state(
                                              sd[f"weight.{bnb_format.quant_state_key(quant_type)}"]
                                          )["nested_offset"])
    lw = pack_lut4(sd["weight"], absmax, sd["weight.quant_map"], 64, (17, 128), wdtype)
    want = bnb_format.dequantize_4bit_state_dict(sd)
    assert want.dtype == wdtype and torch.equal(t4.dequantize_lut4_ref(lw, wdtype), want)


# explicit configs: several N tiles with a ragged edge, uneven and empty K splits (7 tiles
# of 32 in 3 or 5 splits), the FMA path, tensor cores, two M tiles
@pytest.mark.parametrize("split", [1, 3, 5])
@pytest.mark.parametrize("bm,m", [(1, 1), (16, 5), (32, 33)])
def test_fused_configs(split, bm, m):
    w = make_weight(40, 224, "nf4", 32, seed=split)
    cfg = k4._cfg(bm, 16, 32, split)
    check(torch.randn(m, 224).half(), w, run=lambda x, w, o: k4.fused(x, w, o, config=cfg))


def test_fused_rejects_bad_configs():
    w = make_weight(16, 128, "nf4", 64)
    with pytest.raises(ValueError, match="BLOCK_M=1 .* takes M == 1, got M=2"):
        k4.fused(torch.randn(2, 128).half(), w, torch.empty(2, 16).half(), k4._cfg(1, 16, 32, 1))
    with pytest.raises(ValueError, match="BLOCK_K=128 does not divide the block size 64"):
        k4.fused(torch.randn(2, 128).half(), w, torch.empty(2, 16).half(),
                 k4._cfg(16, 16, 128, 1))


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_expand_and_dequant_path(wdtype, monkeypatch):
    w = make_weight(23, 192, "fp4", 64, wdtype)
    for dtype in (torch.float16, torch.bfloat16):
        dense = k4.expand(w, dtype)
        assert dense.dtype == dtype and torch.equal(dense, oracle_weight(w, dtype))
    monkeypatch.setattr(t4, "DEQUANT_GEMM_MIN_M", 20)  # the dispatch takes it from M = 20
    check(torch.randn(21, 192).half(), w)


def test_leading_dims_empty_and_strided():
    w = make_weight(23, 128, "nf4", 64)
    check(torch.randn(2, 3, 128).half(), w)
    assert lut4_matmul(torch.randn(0, 128).half(), w).shape == (0, 23)
    x = torch.randn(128, 4).half().t()  # not K-contiguous
    assert torch.equal(lut4_matmul(x, w), lut4_matmul(x.contiguous(), w))


def _packed(n=4, k=64, bs=64):
    sd = bnb_format.quantize_4bit(torch.randn(n, k), "nf4", bs)
    return dict(packed=sd["weight"], absmax=sd["weight.absmax"], code=sd["weight.quant_map"],
                blocksize=bs, shape=(n, k), wdtype=torch.float16)


@pytest.mark.parametrize("change,match", [
    (dict(blocksize=48, shape=(4, 96)), "block size 48 is not a multiple of 32"),
    (dict(shape=(4, 100)), "K=100 is not a multiple of the block size 64: absmax blocks "
                           "straddle weight rows"),
    (dict(packed=torch.zeros(64, 1, dtype=torch.uint8)), r"64 bytes, but a \[4, 64\] weight "
                                                          "has 128"),
    (dict(absmax=torch.ones(3)), "absmax must hold 4 floats"),
    (dict(code=torch.ones(15)), "16 floats"),
    (dict(wdtype=torch.int8), "weight dtype torch.int8"),
])
def test_pack_rejects_bad_input(change, match):
    args = _packed()
    if "blocksize" in change:
        args = _packed(4, 96, 48)
    args.update({k: v for k, v in change.items() if k != "blocksize"})
    with pytest.raises(ValueError, match=match):
        pack_lut4(**args)


def test_matmul_rejects_bad_input():
    w = make_weight(8, 64, "nf4", 64)
    with pytest.raises(ValueError, match="K=64"):
        lut4_matmul(torch.randn(2, 32).half(), w)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        lut4_matmul(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="out must be"):
        lut4_matmul(torch.randn(2, 64).half(), w, out=torch.empty(2, 9).half())


@pytest.mark.parametrize("m,n,k,bs", [(1, 4096, 4096, 64), (4, 14336, 4096, 64),
                                      (16, 8192, 8192, 128), (1, 128256, 4096, 64),
                                      (64, 4096, 4096, 64), (256, 14336, 4096, 32),
                                      (1024, 8192, 8192, 64), (3, 96, 64, 32)])
def test_pruner(m, n, k, bs):
    mb = k4.m_bucket(m, k4.M_CAP)
    kept = k4.prune(k4.CONFIGS, n, k, bs, mb, 132)
    assert kept and len(kept) <= 12
    assert k < 1024 or k4.SAFE_CONFIG not in kept  # the real shapes have tuned choices
    for c in kept:
        bm, bk, sk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        assert bs % bk == 0 and (bm != 1 or m == 1)
        assert bm <= max(16, mb) and (mb < 128 or bm >= 64)
        assert sk == 1 or (n <= k4.SPLITK_MAX_N and mb <= 256)
    if m == 1:
        assert any(c.kwargs["BLOCK_M"] == 1 for c in kept)


def test_fake_impl_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode
    w = make_weight(17, 128, "nf4", 64, torch.bfloat16)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(5, 128).half())
        fw = t4.Lut4Weight(mode.from_tensor(w.codes), mode.from_tensor(w.absmax),
                           mode.from_tensor(w.lut), w.blocksize, w.wdtype)
        y = lut4_matmul(fx, fw)
        assert y.shape == (5, 17) and y.dtype == torch.float16
    x = torch.randn(3, 128).half()
    result = torch.library.opcheck(torch.ops.quantrt.lut4_matmul.default,
                                   (x, w.codes, w.absmax, w.lut, w.blocksize, w.wround),
                                   test_utils=("test_schema", "test_autograd_registration",
                                               "test_faketensor", "test_aot_dispatch_dynamic"))
    assert all(v == "SUCCESS" for v in result.values()), result
    compiled = torch.compile(lambda x: lut4_matmul(x, w) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), lut4_matmul(x, w) * 2)


# ----------------------------------------------------------------------------- GPU
# Compiles dominate: the small odd shapes use pinned configs; the autotuned shapes are
# multiples of 64 like the benchmark's.
GPU_CASES = CASES[::3]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_id)
def test_gpu_small_shapes(case):
    m, n, qt, bs, dtype, wdtype = case
    k = bs * (3 if bs < 256 else 2)
    w = make_weight(n, k, qt, bs, wdtype, device="cuda", seed=3)
    x = torch.randn(m, k, device="cuda").to(dtype)
    safe = k4.SAFE_CONFIG_M1 if m == 1 else k4.SAFE_CONFIG
    check(x, w, run=lambda x, w, o: k4.fused(x, w, o, config=safe))
    check(x, w, run=lambda x, w, o: t4.dequant_matmul(x, w, o))
    check(x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("dtype,m", [*[(torch.float16, m) for m in (1, 4, 16, 64, 256, 1024)],
                                     (torch.bfloat16, 1), (torch.bfloat16, 64)])
def test_gpu_autotuned(bs, dtype, m):
    w = make_weight(1024, 4096, "nf4", bs, device="cuda", seed=m)
    check(torch.randn(m, 4096, device="cuda", dtype=dtype), w)


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [32, 64])
def test_gpu_every_config(bs):
    # compile and check each config (the autotuner silently skips one that fails in ptxas)
    w = make_weight(320, 1024, "fp4", bs, torch.bfloat16, device="cuda")
    for cfg in k4.CONFIGS + [k4.SAFE_CONFIG, k4.SAFE_CONFIG_M1]:
        if not k4.tile_ok(cfg.kwargs["BLOCK_K"], bs, w.k):
            continue
        m = 1 if cfg.kwargs["BLOCK_M"] == 1 else 2 * cfg.kwargs["BLOCK_M"] - 5  # ragged M tile
        check(torch.randn(m, 1024, device="cuda").half(), w,
              run=lambda x, w, o: k4.fused(x, w, o, config=cfg))


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    w = make_weight(512, 1024, "nf4", 64, device="cuda")
    x = torch.randn(4, 1024, device="cuda").half()
    ref = lut4_matmul(x, w)  # warm-up: autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lut4_matmul(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, lut4_matmul(x, w)) and not torch.equal(y, ref)
    compiled = torch.compile(lambda x: lut4_matmul(x, w) + 1, fullgraph=True)
    assert rel_err(compiled(x), lut4_matmul(x, w) + 1) < 1e-3
