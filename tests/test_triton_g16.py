"""GGUF Q6_K (and Q3_K, Q2_K) on the 16-value sub-block kernels (quant_kernels/triton_g16.py).

The repacked layout dequantizes bit-identically to ``gguf.quants.dequantize`` (Q6_K, Q3_K:
``d * sc`` is exact in fp32 and the product with ``q - zero`` is rounded once, as in
ggml-quants.c; Q2_K likewise, its ``- dmin * m`` rounded once as there).  The kernels run
under TRITON_INTERPRET=1 on the CPU and compiled on CUDA (``@pytest.mark.gpu``).

Tolerance: the kernels accumulate in fp32 like the oracle; what differs is the rounding of
each dequantized weight to the activation dtype on the tl.dot paths and of the output, so
||out - ref|| / ||ref|| < 2e-3 for fp16 activations (2^-11 per rounding; measured <= 4e-4)
and < 1e-2 for bf16 (2^-8; the interpreter's fp32->bf16 cast truncates).  A layout bug (a
nibble, a high pair or a scale off by one position) gives errors of order 1.

Random blocks: gguf-py cannot quantize K-quants, so the blocks are random bytes with a
sane fp16 ``d`` (and ``dmin``): every bit pattern of the other fields is a valid block.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from quant_kernels import g16_layout  # noqa: E402
from quant_kernels.g16_layout import dequantize_g16, g16_reference, to_g16  # noqa: E402

triton = pytest.importorskip("triton")
from quant_kernels import triton_g16 as tg  # noqa: E402
from tests.ptx_interp import half_value, round16, run_ptx  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
D_FIELDS = {Q.Q6_K: [208], Q.Q3_K: [108], Q.Q2_K: [80, 82]}  # fp16 d (and dmin) offsets


def random_blocks(qtype: Q, n: int, k: int, seed: int) -> np.ndarray:
    """uint8 [n, k / 256 * type_size]: random bytes, finite d / dmin in [1e-3, 2e-2]."""
    size = g16_layout.TYPES[qtype][0]
    g = np.random.default_rng(seed)
    raw = g.integers(0, 256, size=(n * k // 256, size), dtype=np.uint8)
    for off in D_FIELDS[qtype]:
        raw[:, off:off + 2] = g.uniform(1e-3, 2e-2, size=raw.shape[0]).astype(np.float16) \
            .view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def gguf_weight(raw: np.ndarray, qtype: Q, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k))


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(x, w, want_w=None, run=None):
    """Run into a NaN-poisoned output; every element written and close to the oracle and
    (when given) to x @ want_w.T with gguf-py's weight."""
    out = torch.full((*x.shape[:-1], w.n), float("nan"), dtype=x.dtype, device=x.device)
    y = tg.g16_matmul(x, w, out=out) if run is None else run(x, w, out)
    assert y.shape == out.shape and y.dtype == x.dtype
    assert not torch.isnan(out).any(), "output elements left unwritten"
    err = rel_err(out, g16_reference(x, w))
    assert err < TOL[x.dtype], f"relative error {err:.3g} against the oracle"
    if want_w is not None:
        ref = x.float() @ want_w.to(x.device).t()
        assert rel_err(out, ref) < TOL[x.dtype]
    return err


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("qtype", g16_layout.SUPPORTED, ids=lambda t: t.name)
def test_repacked_weight_is_bit_exact(qtype):
    n, k = 23, 768
    raw = random_blocks(qtype, n, k, seed=int(qtype))
    w = to_g16(torch.from_numpy(raw), qtype, k)
    assert torch.equal(dequantize_g16(w), gguf_weight(raw, qtype, n, k))
    assert w.sc.is_contiguous() and w.d.t().is_contiguous()  # d group-major
    if qtype == Q.Q6_K:
        assert w.nbytes == raw.nbytes  # 210 bytes per 256 values, as stored


def test_layout_bit_order():
    # one Q6_K block: value k's low nibble at bits 4 (k % 8) of qlo word k // 8, its high
    # pair at bits 2 (k % 8) of qhi word k // 8
    raw = random_blocks(Q.Q6_K, 1, 256, seed=5)
    w = to_g16(torch.from_numpy(raw), Q.Q6_K, 256)
    q = g16_layout.unpack_q(w)[0]
    want = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q6_K).reshape(256))
    dl = float(w.d[0, 0]) * w.sc[0].float().repeat_interleave(16)
    assert torch.equal(dl * (q - 32).float(), want)
    for k in (0, 9, 100, 255):
        assert (int(w.qlo[0, k // 8]) >> 4 * (k % 8)) & 0xF == int(q[k]) & 0xF
        assert (int(w.qhi[0, k // 8]) >> 2 * (k % 8)) & 3 == int(q[k]) >> 4


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="Q4_K has no 16-value sub-block layout"):
        to_g16(torch.zeros(1, 144, dtype=torch.uint8), Q.Q4_K, 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        to_g16(torch.zeros(1, 209, dtype=torch.uint8), Q.Q6_K, 256)
    w = to_g16(torch.from_numpy(random_blocks(Q.Q6_K, 8, 256, 0)), Q.Q6_K, 256)
    with pytest.raises(ValueError, match="K=256"):
        tg.g16_matmul(torch.randn(2, 128).half(), w)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        tg.g16_matmul(torch.randn(2, 256), w)
    with pytest.raises(ValueError, match="out must be"):
        tg.g16_matmul(torch.randn(2, 256).half(), w, out=torch.empty(2, 9).half())


# ----------------------------------------------------------------------------- kernels
# every (M, N, K) of the small odd shapes for Q6_K; Q3_K / Q2_K on a rotating subset
SHAPES = [(m, n, k) for m in (1, 5, 17, 33) for n in (1, 17, 23) for k in (256, 768)]
CASES = [(Q.Q6_K, *s) for s in SHAPES] + \
    [(t, *s) for t in (Q.Q3_K, Q.Q2_K) for s in SHAPES[int(t) % 3::5]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-m{c[1]}-n{c[2]}-k{c[3]}")
def test_matches_oracle_and_gguf(case):
    qtype, m, n, k = case
    raw = random_blocks(qtype, n, k, seed=m * 1000 + n * 10 + k)
    w = to_g16(torch.from_numpy(raw), qtype, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).half()
    check(x, w, gguf_weight(raw, qtype, n, k))


@pytest.mark.parametrize("qtype,m", [(Q.Q6_K, 3), (Q.Q6_K, 40), (Q.Q2_K, 9)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_dequant_path(qtype, m):
    n, k = 23, 512
    raw = random_blocks(qtype, n, k, seed=m)
    w = to_g16(torch.from_numpy(raw), qtype, k)
    dense = tg.dequantize(w, torch.float16)
    assert torch.equal(dense, gguf_weight(raw, qtype, n, k).half())  # one rounding
    check(torch.randn(m, k).half(), w, run=lambda x, w, o: tg.dequant_matmul(x, w, o))


@pytest.mark.parametrize("m,n,qtype", [(1, 23, Q.Q6_K), (5, 17, Q.Q6_K), (33, 17, Q.Q3_K)])
def test_bf16_activations(m, n, qtype):
    w = to_g16(torch.from_numpy(random_blocks(qtype, n, 512, seed=n)), qtype, 512)
    check(torch.randn(m, 512).bfloat16(), w)


# explicit configs: a ragged N edge over several N tiles, uneven and empty K splits, a
# 512-wide K tile past K, both decode paths, several M tiles with the swizzle
@pytest.mark.parametrize("bm,bk,split", [(1, 128, 1), (1, 128, 4), (1, 256, 2), (16, 128, 4),
                                         (16, 64, 5)])
def test_gemv_configs(bm, bk, split):
    m = 1 if bm == 1 else 5
    w = to_g16(torch.from_numpy(random_blocks(Q.Q6_K, 23, 768, seed=bk)), Q.Q6_K, 768)
    cfg = tg._cfg(bm, 16, bk, split)
    check(torch.randn(m, 768).half(), w, run=lambda x, w, o: tg.gemv(x, w, o, config=cfg))


@pytest.mark.parametrize("bm,split", [(16, 1), (16, 2), (32, 3)])
def test_gemm_configs(bm, split):
    w = to_g16(torch.from_numpy(random_blocks(Q.Q6_K, 40, 768, seed=bm)), Q.Q6_K, 768)
    cfg = tg._cfg(bm, 16, 128, split, gm=2)
    check(torch.randn(50, 768).half(), w, run=lambda x, w, o: tg.gemm(x, w, o, config=cfg))


def test_strided_inputs_leading_dims_and_empty():
    w = to_g16(torch.from_numpy(random_blocks(Q.Q6_K, 17, 256, seed=2)), Q.Q6_K, 256)
    wide_x, wide_out = torch.randn(5, 300).half(), torch.full((5, 40), float("nan")).half()
    x, out = wide_x[:, 7:263], wide_out[:, 3:20]  # row strides 300 and 40
    tg.g16_matmul(x, w, out=out)
    assert rel_err(out, g16_reference(x, w)) < TOL[torch.float16]
    assert wide_out[:, :3].isnan().all() and wide_out[:, 20:].isnan().all()
    check(torch.randn(2, 3, 256).half(), w)
    assert tg.g16_matmul(torch.randn(0, 256).half(), w).shape == (0, 17)


def test_fake_impl_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = to_g16(torch.from_numpy(random_blocks(Q.Q2_K, 17, 256, seed=1)), Q.Q2_K, 256)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(5, 256).half())
        fw = g16_layout.G16Weight(*(None if t is None else mode.from_tensor(t) for t in
                                    (w.qlo, w.qhi, w.sc, w.d, w.mn, w.dmin)), w.k, w.zero)
        y = tg.g16_matmul(fx, fw)
        assert y.shape == (5, 17) and y.dtype == torch.float16
    x = torch.randn(3, 256).half()
    args = (x, w.qlo, w.qhi, w.sc, w.d, w.mn, w.dmin, w.k, w.zero)
    result = torch.library.opcheck(torch.ops.quantrt.g16_matmul.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    compiled = torch.compile(lambda x: tg.g16_matmul(x, w) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), tg.g16_matmul(x, w) * 2)


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (4, 14336, 4096), (16, 4096, 14336),
                                   (1, 128256, 4096)])
def test_gemv_pruner(m, n, k):
    args = dict(x_ptr=torch.empty(1), N=n, K=k, M_BUCKET=tg.m_bucket(m, 16))
    kept = tg._prune_gemv(tg.GEMV_CONFIGS, args)
    assert kept and len(kept) <= 12  # autotuning time per shape
    assert all(c.kwargs["SPLIT_K"] == 1 for c in kept if n > tg.SPLITK_MAX_N)
    assert any(c.kwargs["SPLIT_K"] > 1 for c in kept) == (n <= tg.SPLITK_MAX_N)
    assert all(c.kwargs["BLOCK_M"] == 16 or m == 1 for c in kept)
    assert any(c.kwargs["BLOCK_M"] == 1 for c in kept) == (m == 1)


@pytest.mark.parametrize("qtype", g16_layout.SUPPORTED, ids=lambda t: t.name)
def test_ptx_dequant_recipe(qtype):
    # the GPU fast path's bit logic (nibble and pair positions, prmt selectors, magic
    # numbers) on the CPU, against the layout's own unpacking; the GPU tests run the
    # real instructions
    _, zero, has_hi = g16_layout.TYPES[qtype]
    asm = g16_layout.ptx_f16(has_hi, zero)
    rng = np.random.default_rng(int(qtype))
    for _ in range(200):
        q = rng.integers(0, 64 if has_hi else 16, (2, 8))
        lo = [sum(int(v & 15) << 4 * j for j, v in enumerate(row)) for row in q]
        hi = [sum(int(v >> 4) << 2 * j for j, v in enumerate(row)) for row in q]
        hi = [h - (1 << 16) if h >= 1 << 15 else h for h in hi]  # int16 sign-extended
        s = [round16(v) for v in rng.uniform(1e-3, 0.1, 2)]
        b = [round16(v) for v in rng.uniform(-1, 0, 2)]
        regs = {"$8": lo[0] & 0xFFFFFFFF, "$9": lo[1] & 0xFFFFFFFF,
                "$10": hi[0] & 0xFFFFFFFF, "$11": hi[1] & 0xFFFFFFFF,
                "$12": s[0] | s[1] << 16, "$13": b[0] | b[1] << 16}
        regs = run_ptx(asm, regs)
        for p in range(8):
            want = [round16((int(q[i, p]) - zero) * half_value(s[i]) + half_value(b[i]))
                    for i in range(2)]
            assert regs[f"${p}"] == want[0] | want[1] << 16, (p, q[:, p])


# ----------------------------------------------------------------------------- selection
def test_ggml_kernel_choice():
    from quantrt.quant.ggml_kernels import (GGMLTensor, TritonDequantKernel, TritonG16Kernel,
                                            TritonWQKernel, pick_kernel)

    cuda = torch.device("cuda")
    for qtype in g16_layout.SUPPORTED:
        t = GGMLTensor(torch.zeros(4, g16_layout.TYPES[qtype][0], dtype=torch.uint8),
                       int(qtype), (4, 256))
        kernel, refused = pick_kernel(t, cuda, "auto")
        assert kernel is TritonG16Kernel, qtype
        assert "no WQWeight layout" in dict(refused)[TritonWQKernel.name]
    iq = GGMLTensor(torch.zeros(4, 136, dtype=torch.uint8), int(Q.IQ4_XS), (4, 256))
    kernel, refused = pick_kernel(iq, cuda, "auto")
    assert kernel is TritonDequantKernel
    assert "IQ4_XS has no 16-value sub-blocks" in dict(refused)[TritonG16Kernel.name]
    assert pick_kernel(t, torch.device("cpu"), "auto")[0] is not TritonG16Kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_ggml_kernel_runs(dtype):
    # the layer kernel on the CPU (interpreted), against the torch reference kernel
    from quantrt.quant.ggml_kernels import DequantKernel, GGMLTensor, TritonG16Kernel

    n, k = 23, 512
    t = GGMLTensor(torch.from_numpy(random_blocks(Q.Q6_K, n, k, 9)), int(Q.Q6_K), (n, k))
    kern = TritonG16Kernel(t, dtype, torch.device("cpu"))
    x = torch.randn(3, k, dtype=dtype)
    y = kern(x)
    assert y.dtype == dtype
    assert rel_err(y, DequantKernel(t, dtype, torch.device("cpu"))(x)) < 2e-3
    assert kern.w.nbytes == t.data.numel()  # Q6_K: as many bytes as the GGUF blocks


# ----------------------------------------------------------------------------- GPU
def fast_dequant_reference(w) -> torch.Tensor:
    """What the fp16 PTX dequant gives: ``fma(q - zero, fp16(d sc), fp16(-dmin m))``
    rounded once to fp16 (float64 holds the products and sums exactly)."""
    sub, sup = torch.arange(w.k) // 16, torch.arange(w.k) // 256
    s = (w.d.float()[:, sup] * w.sc.float()[:, sub]).half().double()
    b = 0.0 if w.mn is None else (-(w.dmin.float()[:, sup] * w.mn.float()[:, sub])).half().double()
    return ((g16_layout.unpack_q(w) - w.zero).double() * s + b).half()



@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: f"{c[0].name}-m{c[1]}-n{c[2]}-k{c[3]}")
def test_gpu_small_shapes(case, monkeypatch):
    qtype, m, n, k = case
    raw = random_blocks(qtype, n, k, seed=m + n + k)
    w = to_g16(torch.from_numpy(raw), qtype, k).to("cuda")
    want = gguf_weight(raw, qtype, n, k)
    x = torch.randn(m, k, device="cuda").half()
    if m == 1:
        check(x, w, want, run=lambda x, w, o: tg.gemv(x, w, o, config=tg._cfg(1, 32, 128, 2)))
    if m <= 16:
        check(x, w, want, run=lambda x, w, o: tg.gemv(x, w, o, config=tg.SAFE_GEMV_CONFIG))
    check(x, w, want, run=lambda x, w, o: tg.gemm(x, w, o, config=tg.SAFE_GEMM_CONFIG))
    check(x, w, want, run=lambda x, w, o: tg.dequant_matmul(x, w, o))
    # the fp16 PTX path rounds s = d * sc (and b) to fp16 first, then one fp16 FMA
    assert torch.equal(tg.dequantize(w, torch.float16).cpu(), fast_dequant_reference(w.to("cpu")))
    monkeypatch.setenv("QUANTRT_G16_FAST_DEQUANT", "0")
    assert torch.equal(tg.dequantize(w, torch.float16).cpu(), want.half())
    if m <= 16:
        check(x, w, want, run=lambda x, w, o: tg.gemv(x, w, o, config=tg.SAFE_GEMV_CONFIG))
    check(x, w, want, run=lambda x, w, o: tg.gemm(x, w, o, config=tg.SAFE_GEMM_CONFIG))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype,dtype,m", [
    *[(Q.Q6_K, torch.float16, m) for m in (1, 5, 16, 64, 300, 1024)],
    (Q.Q6_K, torch.bfloat16, 1), (Q.Q6_K, torch.bfloat16, 64),
    (Q.Q3_K, torch.float16, 1), (Q.Q2_K, torch.float16, 64)], ids=str)
def test_gpu_autotuned(qtype, dtype, m):
    n, k = 1024, 4096
    raw = random_blocks(qtype, n, k, seed=m)
    w = to_g16(torch.from_numpy(raw), qtype, k).to("cuda")
    check(torch.randn(m, k, device="cuda", dtype=dtype), w, gguf_weight(raw, qtype, n, k))


@pytest.mark.gpu
def test_gpu_every_config():
    # the autotuner silently skips a config that fails to compile: check each once
    w = to_g16(torch.from_numpy(random_blocks(Q.Q6_K, 320, 1024, 0)), Q.Q6_K, 1024).to("cuda")
    for cfg in tg.GEMV_CONFIGS:
        m = 1 if cfg.kwargs["BLOCK_M"] == 1 else 11
        check(torch.randn(m, 1024, device="cuda").half(), w,
              run=lambda x, w, o, cfg=cfg: tg.gemv(x, w, o, config=cfg))
    for cfg in tg.GEMM_CONFIGS:
        check(torch.randn(200, 1024, device="cuda").half(), w,
              run=lambda x, w, o, cfg=cfg: tg.gemm(x, w, o, config=cfg))


@pytest.mark.gpu
def test_gpu_cuda_graph_compile_and_layer_kernel():
    from quantrt.quant.ggml_kernels import GGMLTensor, TritonG16Kernel, pick_kernel

    raw = torch.from_numpy(random_blocks(Q.Q6_K, 512, 1024, 3))
    t = GGMLTensor(raw, int(Q.Q6_K), (512, 1024))
    assert pick_kernel(t, torch.device("cuda"), "auto")[0] is TritonG16Kernel
    kern = TritonG16Kernel(t, torch.float16, torch.device("cuda"))
    x = torch.randn(4, 1024, device="cuda").half()
    ref = kern(x)  # warm-up: autotune outside the capture
    assert rel_err(ref, x.float() @ t.to_float().cuda().t()) < TOL[torch.float16]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kern(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, kern(x)) and not torch.equal(y, ref)
    compiled = torch.compile(lambda x: tg.g16_matmul(x, kern.w) + 1, fullgraph=True)
    assert rel_err(compiled(x), tg.g16_matmul(x, kern.w) + 1) < 1e-3


@pytest.mark.gpu
def test_gpu_torch_fallback_of_large_tensor():
    # the torch dequantize + F.linear path (other GGML types on CUDA) dequantizes past
    # 2**19 values in chunks, whose buffer must be on the device too
    from quantrt.quant.ggml_kernels import DequantKernel, GGMLTensor, TritonG16Kernel

    n, k = 4096, 256
    t = GGMLTensor(torch.from_numpy(random_blocks(Q.Q6_K, n, k, 4)), int(Q.Q6_K), (n, k))
    x = torch.randn(3, k, device="cuda").half()
    y = DequantKernel(t.to(torch.device("cuda")), torch.float16, torch.device("cuda"))(x)
    want = TritonG16Kernel(t, torch.float16, torch.device("cuda"))(x)
    assert y.is_cuda and rel_err(y, want) < TOL[torch.float16]
