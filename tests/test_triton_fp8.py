"""quant_kernels.triton_fp8 (fused FP8 weight-only matmul) against its fp32 torch oracle,
and the FP8 kernel classes that run it (quantrt.quant.fp8_kernels, compressed-tensors).

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set here, before Triton is
imported); the interpreter loads and converts tl.float8e4nv itself (only the e4m3fn NaN
codes differ, and weights never hold them), so both conversion paths run unemulated.
``@pytest.mark.gpu`` tests run the compiled kernels on CUDA.

Tolerance: the reference is ``x.float() @ (q.float() * s).T`` in fp32.  The kernels
multiply the exact e4m3 values by x in the MMA, accumulate in fp32 and scale in fp32, so
only the summation order and the output's rounding differ: ||out - ref|| / ||ref|| < 1e-3
for fp16 (2^-11 per output; measured <= 1e-8 here, where both round the same fp32 value)
and < 8e-3 for bf16 (2^-8; measured <= 4.7e-3 under the interpreter, whose fp32 -> bf16
cast truncates).  A layout bug (a scale block or K tile off by one) gives errors of
order 1e-1 and more.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from formats import fp8 as fp8_format  # noqa: E402
from quant_kernels import triton_fp8 as t8  # noqa: E402
from quant_kernels import triton_fp8_kernels as k8  # noqa: E402
from quant_kernels.triton_fp8 import fp8_matmul, fp8_reference, pack_fp8  # noqa: E402

TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
CPU = "cpu"


def make_weight(n, k, scales, device=CPU, seed=0):
    """FP8 weight of a random W: ``scales`` "tensor", "channel" or a block (bn, bk)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) + 0.2)
    block = scales if isinstance(scales, tuple) else None
    q, s = fp8_format.quantize(w, "block" if block else scales, block or (1, 1))
    return pack_fp8(q.to(device), s.to(device), block)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(x, w, run=None):
    """Run into a NaN-poisoned buffer: every element written, close to the oracle."""
    poison = torch.full((*x.shape[:-1], w.n), float("nan"), dtype=x.dtype, device=x.device)
    y = fp8_matmul(x, w, out=poison) if run is None else run(x, w, poison)
    assert y.shape == (*x.shape[:-1], w.n) and y.dtype == x.dtype
    assert not torch.isnan(poison).any(), "output elements left unwritten"
    err = rel_err(poison, fp8_reference(x, w))
    assert err < TOL[x.dtype], f"relative error {err:.3g}"
    return err


# every K x scale layout x dtype; (M, N) rotate over the small odd shapes.  Blocks: the
# DeepSeek 128x128 (one partial block), 16x32 (partial edge blocks both ways), 8x48 (a
# width only 16-wide tiles divide), 1x32 (compressed-tensors group scales).
SCALES = ["channel", "tensor", (128, 128), (16, 32), (8, 48), (1, 32)]
MN = [(m, n) for m in (1, 5, 17, 33) for n in (1, 17, 23)]
CASES = [(k, s, dt) for k in (32, 100, 256) for s in SCALES
         for dt in (torch.float16, torch.bfloat16)]
CASES = [(*MN[i % len(MN)], *c) for i, c in enumerate(CASES)]


def _id(c):
    m, n, k, s, dt = c
    s = "x".join(map(str, s)) if isinstance(s, tuple) else s
    return f"m{m}-n{n}-k{k}-{s}-{str(dt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case):
    m, n, k, scales, dtype = case
    w = make_weight(n, k, scales, seed=CASES.index(case))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(dtype)
    check(x, w)
    # the functional path gives what out= gives
    assert torch.equal(fp8_matmul(x, w), fp8_matmul(x, w, out=torch.empty(m, n, dtype=dtype)))


@pytest.mark.parametrize("m,scales,dtype", [(1, "channel", torch.float16),
                                            (5, (16, 32), torch.bfloat16),
                                            (33, (128, 128), torch.float16),
                                            (17, (8, 48), torch.bfloat16)])
def test_bits_conversion(m, scales, dtype):
    # the sm_80/86 path: e4m3 bits moved under fp16's exponent, 2**8 folded into the scale
    w = make_weight(23, 100, scales, seed=m)
    run = k8.gemv if m <= t8.DECODE_MAX_M else k8.gemm
    check(torch.randn(m, 100).to(dtype), w, run=lambda x, w, o: run(x, w, o, cvt=False))
    dense = k8.dequantize(w, dtype, cvt=False)
    assert rel_err(dense, t8.dequantize_fp8_ref(w)) < TOL[dtype]


def test_bits_conversion_is_exact_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # the two NaN codes
    q = codes.view(torch.float8_e4m3fn).reshape(2, 127)[:, :112]
    w = pack_fp8(q, torch.ones(2))
    for cvt in (True, False):
        assert torch.equal(k8.dequantize(w, torch.float16, cvt=cvt).float(), q.float())


# explicit configs: several N tiles with a ragged edge, uneven and empty K splits
# (7 tiles of 16 in 3 or 5 splits), the M swizzle; per-row and block scales
@pytest.mark.parametrize("split", [1, 3, 5])
@pytest.mark.parametrize("scales", ["channel", (16, 32)])
def test_gemv_configs(split, scales):
    w = make_weight(40, 100, scales, seed=split)
    cfg = k8._cfg(16, 16, split)
    check(torch.randn(5, 100).half(), w, run=lambda x, w, o: k8.gemv(x, w, o, config=cfg))


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("scales", ["channel", (16, 32)])
def test_gemm_configs(split, scales):
    w = make_weight(40, 100, scales, seed=split)
    cfg = k8._gcfg(16, 16, 32, split, gm=2)
    check(torch.randn(50, 100).half(), w, run=lambda x, w, o: k8.gemm(x, w, o, config=cfg))


@pytest.mark.parametrize("scales", ["channel", (16, 32)])
def test_dequant_path(scales, monkeypatch):
    w = make_weight(23, 100, scales)
    for dtype in (torch.float16, torch.bfloat16):
        dense = k8.dequantize(w, dtype)
        assert dense.dtype == dtype and rel_err(dense, t8.dequantize_fp8_ref(w)) < TOL[dtype]
    monkeypatch.setattr(t8, "DEQUANT_GEMM_MIN_M", 20)  # the dispatch takes it from M = 20
    check(torch.randn(21, 100).half(), w)


def test_leading_dims_empty_and_strided():
    w = make_weight(23, 100, (16, 32))
    check(torch.randn(2, 3, 100).half(), w)
    assert fp8_matmul(torch.randn(0, 100).half(), w).shape == (0, 23)
    x = torch.randn(100, 4).half().t()  # not K-contiguous
    assert torch.equal(fp8_matmul(x, w), fp8_matmul(x.contiguous(), w))


@pytest.mark.parametrize("args,match", [
    (dict(q=torch.zeros(4, 32)), "float8_e4m3fn"),
    (dict(scales=torch.ones(3)), r"shape \[1\], \[N\] or \[N, 1\] with N=4"),
    (dict(block=(4, 24), scales=torch.ones(1, 2)), "bk a multiple of 16"),
    (dict(block=(4, 16), scales=torch.ones(1, 1)), r"= \[1, 2\]"),
    (dict(scales=torch.ones(4, dtype=torch.int32)), "floating-point"),
])
def test_pack_rejects_bad_input(args, match):
    a = dict(q=torch.zeros(4, 32).to(torch.float8_e4m3fn), scales=torch.ones(4), block=None)
    a.update(args)
    with pytest.raises(ValueError, match=match):
        pack_fp8(a["q"], a["scales"], a["block"])


def test_matmul_rejects_bad_input():
    w = make_weight(8, 64, "channel")
    with pytest.raises(ValueError, match="K=64"):
        fp8_matmul(torch.randn(2, 32).half(), w)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        fp8_matmul(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="out must be"):
        fp8_matmul(torch.randn(2, 64).half(), w, out=torch.empty(2, 9).half())


@pytest.mark.parametrize("m,n,k,sbk", [(1, 4096, 4096, 0), (4, 14336, 4096, 128),
                                       (16, 4096, 14336, 128), (1, 128256, 4096, 0),
                                       (8, 96, 100, 48)])
def test_gemv_pruner(m, n, k, sbk):
    args = dict(x_ptr=torch.empty(1), N=n, K=k, SBK=sbk, M_BUCKET=k8.m_bucket(m, 16))
    kept = k8._prune_gemv(k8.GEMV_CONFIGS, args)
    assert kept and len(kept) <= 10
    for c in kept:
        assert sbk == 0 or sbk % c.kwargs["BLOCK_K"] == 0
        assert c.kwargs["SPLIT_K"] == 1 or n <= k8.SPLITK_MAX_N
    if sbk == 48:
        assert kept == [k8.SAFE_GEMV_CONFIG]


@pytest.mark.parametrize("m,n,k,sbk", [(17, 4096, 4096, 128), (64, 8192, 8192, 0),
                                       (4096, 14336, 4096, 128), (300, 4096, 4096, 0)])
def test_gemm_pruner(m, n, k, sbk):
    args = dict(x_ptr=torch.empty(1), N=n, K=k, SBK=sbk, M_BUCKET=k8.m_bucket(m, 4096))
    kept = k8._prune_gemm(k8.GEMM_CONFIGS, args)
    assert kept and len(kept) <= 8
    for c in kept:
        assert sbk == 0 or sbk % c.kwargs["BLOCK_K"] == 0
        assert c.kwargs["BLOCK_M"] <= max(32, args["M_BUCKET"])
        assert c.kwargs["SPLIT_K"] == 1 or args["M_BUCKET"] <= 256


def test_fake_impl_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode
    w = make_weight(17, 96, (16, 32))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(5, 96).half())
        fw = t8.Fp8Weight(mode.from_tensor(w.q), mode.from_tensor(w.scales), w.block)
        y = fp8_matmul(fx, fw)
        assert y.shape == (5, 17) and y.dtype == torch.float16
    x = torch.randn(3, 96).half()
    # (no test_schema: its mutation check multiplies the inputs, which CPU fp8 cannot)
    result = torch.library.opcheck(torch.ops.quantrt.fp8_matmul.default,
                                   (x, w.q, w.scales, 16, 32),
                                   test_utils=("test_autograd_registration", "test_faketensor",
                                               "test_aot_dispatch_dynamic"))
    assert all(v == "SUCCESS" for v in result.values()), result
    compiled = torch.compile(lambda x: fp8_matmul(x, w) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), fp8_matmul(x, w) * 2)


# ----------------------------------------------------------------------------- kernel class
def _fp8_layer(block, rows, cols, seed=0):
    from quantrt.quant.fp8 import Fp8Config, Fp8Params
    from tests.test_quant_bnb import _linear

    gen = torch.Generator().manual_seed(seed)
    layer = _linear(Fp8Config(Fp8Params("block", block=block) if block else
                              Fp8Params("tensor")), cols, rows)
    layer.params_dtype = torch.float16
    for shard, n in enumerate(rows):
        q, s = fp8_format.quantize(torch.randn(n, cols, generator=gen) * (shard + 1),
                                   "block" if block else "tensor", block or (1, 1))
        layer.load("weight", q, shard)
        layer.load("weight_scale_inv" if block else "weight_scale", s, shard)
    return layer


@pytest.mark.parametrize("block,rows,cut", [
    (None, [24, 9], None),        # per-tensor shard scales repeated per row
    ((16, 32), [32, 9], None),    # shard grids that tile the fused weight
    ((16, 32), [24, 9], None),    # a shard ending inside a block row: per-row block scales
    ((16, 32), [48, 40], "rows"), ((16, 32), [48, 40], "cols")])  # tensor-parallel cuts
def test_kernel_class_builds_from_raw_shards(block, rows, cut):
    from quantrt.quant.fp8_kernels import Fp8DequantKernel, Fp8TritonKernel

    layer = _fp8_layer(block, rows, 100)
    if cut == "rows":  # rank 1 of 2: whole blocks of each shard
        layer.method.shard(layer, [[(16, 48)], [(16, 32)]], None)
        layer.output_sizes = [32, 16]
    elif cut == "cols":
        layer.method.shard(layer, None, (32, 100))
        layer.input_size = 68
    dev = torch.device("cpu")
    ok, why = Fp8TritonKernel.can_implement(layer.method, layer, dev, "auto")
    assert not ok and "CUDA" in why
    fast = Fp8TritonKernel(layer.method, layer, dev)  # what can_implement allows on CUDA
    want = Fp8DequantKernel(layer.method, layer, dev)
    assert fast.tensors() == [fast.w.q, fast.w.scales]
    x = torch.randn(3, layer.input_size).half()
    assert rel_err(fast(x), want(x.float()).half()) < 2e-3


def test_kernel_order_and_inspect_reason():
    from quantrt.quant.fp8_kernels import FP8_KERNELS, Fp8ScaledMMKernel, Fp8TritonKernel

    assert FP8_KERNELS.index(Fp8ScaledMMKernel) < FP8_KERNELS.index(Fp8TritonKernel) < 2
    layer = _fp8_layer((16, 32), [32, 9], 100)
    layer.process_weights_after_loading(torch.device("cpu"))
    refused = dict(layer.kernel_choice.refused)
    assert refused[Fp8TritonKernel.name] == "runs on CUDA GPUs only (device is cpu)"
    assert Fp8TritonKernel.name in layer.kernel_choice.describe()


# ----------------------------------------------------------------------------- GPU
# Compiles dominate: the small odd shapes use pinned configs; the autotuned shapes are
# multiples of 16 like the benchmark's.
GPU_CASES = CASES[::5]


def _cvt_paths():
    return (True, False) if k8.cvt_ok(torch.device("cuda")) else (False,)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_id)
def test_gpu_small_shapes(case):
    m, n, k, scales, dtype = case
    w = make_weight(n, k, scales, device="cuda", seed=3)
    x = torch.randn(m, k, device="cuda").to(dtype)
    for cvt in _cvt_paths():
        if m <= 16:
            check(x, w, run=lambda x, w, o: k8.gemv(x, w, o, config=k8.SAFE_GEMV_CONFIG, cvt=cvt))
        check(x, w, run=lambda x, w, o: k8.gemm(x, w, o, config=k8.SAFE_GEMM_CONFIG, cvt=cvt))
    check(x, w, run=lambda x, w, o: t8.dequant_matmul(x, w, o))


@pytest.mark.gpu
@pytest.mark.parametrize("scales", ["channel", (128, 128)])
@pytest.mark.parametrize("dtype,m", [*[(torch.float16, m) for m in (1, 16, 64, 1024)],
                                     (torch.bfloat16, 1), (torch.bfloat16, 64)])
def test_gpu_autotuned(scales, dtype, m):
    w = make_weight(1024, 4096, scales, device="cuda", seed=m)
    check(torch.randn(m, 4096, device="cuda", dtype=dtype), w)


@pytest.mark.gpu
@pytest.mark.parametrize("scales", ["channel", (128, 128)])
def test_gpu_every_config(scales):
    # compile and check each config (the autotuner silently skips one that fails in ptxas)
    w = make_weight(320, 1024, scales, device="cuda")
    for cvt in _cvt_paths():
        for cfg in k8.GEMV_CONFIGS + [k8.SAFE_GEMV_CONFIG]:
            if k8.k_tile_fits(cfg.kwargs["BLOCK_K"], w.scale_blocks[1], w.k):
                check(torch.randn(11, 1024, device="cuda").half(), w,
                      run=lambda x, w, o: k8.gemv(x, w, o, config=cfg, cvt=cvt))
        for cfg in k8.GEMM_CONFIGS + [k8.SAFE_GEMM_CONFIG]:
            if k8.k_tile_fits(cfg.kwargs["BLOCK_K"], w.scale_blocks[1], w.k):
                check(torch.randn(200, 1024, device="cuda").bfloat16(), w,
                      run=lambda x, w, o: k8.gemm(x, w, o, config=cfg, cvt=cvt))


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    w = make_weight(512, 1024, (128, 128), device="cuda")
    x = torch.randn(4, 1024, device="cuda").half()
    ref = fp8_matmul(x, w)  # warm-up: autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8_matmul(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, fp8_matmul(x, w)) and not torch.equal(y, ref)
    compiled = torch.compile(lambda x: fp8_matmul(x, w) + 1, fullgraph=True)
    assert rel_err(compiled(x), fp8_matmul(x, w) + 1) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8_block128", "ct_fp8_block"])
def test_gpu_checkpoint_layers_pick_the_fused_kernel(name, tmp_path):
    """fp8 block checkpoints take the fused kernel (W8A8 refuses block scales); a
    compressed-tensors weight-only FP8 copy (input_activations removed) does too."""
    from quantrt.loader import load
    from tests.fixture_util import FIXTURES, copy_fixture, edit_config

    src = FIXTURES / name
    if name.startswith("ct_"):
        src = copy_fixture(tmp_path, name)
        edit_config(src, lambda q: q["config_groups"]["group_0"].pop("input_activations"))
    lm = load(src, device="cuda", dtype=torch.float16, progress=False)
    layer = lm.model.layers[0].mlp.down_proj
    assert layer.kernel_choice.name.startswith("fp8 weight-only (fused Triton"), \
        layer.kernel_choice.describe()
    x = torch.randn(3, layer.input_size, device="cuda").half()
    w = t8.dequantize_fp8_ref(layer.packed_kernel.w)
    ref = (x.float() @ w.t()).half()
    assert rel_err(layer(x), ref) < TOL[torch.float16]
