"""Triton dequant of the GGML types without a fused kernel (quant_kernels/triton_ggml_dequant.py).

Tolerance: none.  The kernels do gguf_ref's fp32 operations in its order, so fp32 output
is ``torch.equal`` to ``gguf_ref.dequantize`` (itself bit-exact with gguf-py), and fp16 /
bf16 output equals that cast with torch (round to nearest even; the kernel rounds bf16
by hand since Triton's interpreter truncates).  A wrong index (a nibble, a sign bit, a
grid entry) changes whole values, which equality catches.

Inputs: random bytes for every block with finite scale fields (test_gguf_ref's generator,
fp16 ``d`` over 2^-26..2^6 so fp16 output also sees subnormals and overflow to inf), and
for the types gguf-py can quantize, quantized random floats.  Outputs are prefilled with
NaN so an unwritten element shows.  The CPU runs the kernels under TRITON_INTERPRET=1
(set by conftest); ``@pytest.mark.gpu`` repeats them compiled on CUDA at larger shapes.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gguf import quants as gq  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from quant_kernels import gguf_ref  # noqa: E402
from tests.test_gguf_ref import QUANTIZABLE, _random_blocks  # noqa: E402

pytest.importorskip("triton")
from quant_kernels import triton_ggml_dequant as tgd  # noqa: E402

TYPES = tgd.SUPPORTED
# (rows, blocks per row): odd row counts, one and several blocks per row
SHAPES = [(1, 3), (17, 2), (23, 1)]
# few blocks per program, so the grids have a partial last program
SMALL_PROGRAM = 512
# casting wide-range random values to fp16 overflows to inf (in torch too): expected
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def poisoned(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.full((rows, cols), float("nan"), dtype=dtype, device=device)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(want).any(), "test input produced NaN; fix the generator"
    assert not torch.isnan(got).any(), "output elements left unwritten"
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:4].tolist()
        raise AssertionError(f"{(got != want).sum().item()} values differ, e.g. at {bad}: "
                             f"{[got[tuple(i)].item() for i in bad]} vs "
                             f"{[want[tuple(i)].item() for i in bad]}")


def run_case(qtype: Q, rows: int, blocks: int, seed: int, dtypes, device, **kw) -> None:
    raw = torch.from_numpy(_random_blocks(qtype, rows, blocks, seed))
    want = gguf_ref.dequantize(raw, int(qtype))
    raw = raw.to(device)
    for dtype in dtypes:
        out = poisoned(*want.shape, dtype, device)
        got = tgd.dequantize(raw, int(qtype), want.shape[1], dtype, out=out, **kw)
        assert got is out
        assert_same(out, want.to(dtype))


# ----------------------------------------------------------------------------- CPU (interpreted)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"r{s[0]}-b{s[1]}")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype, shape):
    rows, blocks = shape
    # fp32 on every shape; the rounded outputs on one (they share the kernel's math)
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if rows == 17 else [])
    run_case(qtype, rows, blocks, 31 * int(qtype) + rows, dtypes, "cpu",
             values_per_program=SMALL_PROGRAM)


@pytest.mark.parametrize("qtype", [t for t in QUANTIZABLE if t in tgd.TYPES],
                         ids=lambda t: t.name)
def test_quantized_weights(qtype):
    # real-looking blocks: gguf-py quantizes random floats (23 rows of 2 blocks)
    block, _ = gguf_ref.block_info(qtype)
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((23, 2 * block)) * 0.05).astype(np.float32)
    raw = torch.from_numpy(np.ascontiguousarray(gq.quantize(x, qtype)).view(np.uint8))
    want = torch.from_numpy(gq.dequantize(raw.numpy(), qtype))
    out = poisoned(23, 2 * block, torch.float32, "cpu")
    tgd.dequantize(raw, int(qtype), 2 * block, torch.float32, out=out)
    assert_same(out, want)


def test_strided_rows_and_default_output():
    # rows that are a slice of wider storage (a tensor-parallel column split) and an
    # output allocated by the call
    qtype = Q.IQ4_XS
    raw = torch.from_numpy(_random_blocks(qtype, 5, 3, seed=2))
    part = raw[:, 136:]                           # blocks 1 and 2 of each row
    assert part.stride(0) == 3 * 136 and not part.is_contiguous()
    got = tgd.dequantize(part, int(qtype), dtype=torch.float32)
    assert_same(got, gguf_ref.dequantize(part.contiguous(), int(qtype)))
    wide = poisoned(5, 600, torch.float16, "cpu")
    tgd.dequantize(part, int(qtype), 512, torch.float16, out=wide[:, 7:519])
    assert_same(wide[:, 7:519], gguf_ref.dequantize(part.contiguous(), int(qtype)).half())
    assert torch.isnan(wide[:, :7]).all() and torch.isnan(wide[:, 519:]).all()
    assert tgd.dequantize(raw[:0], int(qtype)).shape == (0, 768)


def test_bad_input_is_refused(monkeypatch):
    raw = torch.from_numpy(_random_blocks(Q.IQ2_XXS, 4, 2, seed=1))   # 66-byte blocks
    t = int(Q.IQ2_XXS)
    cases = [
        (lambda: tgd.dequantize(raw, int(Q.Q4_0)), "Q4_0 has no Triton dequant kernel"),
        (lambda: tgd.dequantize(raw, 4242), "unknown type 4242 has no Triton dequant"),
        (lambda: tgd.dequantize(raw.float(), t), r"uint8 \[rows, row_bytes\].*float32"),
        (lambda: tgd.dequantize(raw.reshape(-1), t), r"uint8 \[rows, row_bytes\]"),
        (lambda: tgd.dequantize(raw[:, :65], t), "65 bytes, not a positive multiple of the 66"),
        (lambda: tgd.dequantize(raw.t().contiguous().t(), t), "contiguous rows"),
        (lambda: tgd.dequantize(raw, t, cols=256), "hold 512 values, not cols=256"),
        (lambda: tgd.dequantize(raw, t, dtype=torch.float64), "float16, bfloat16 or float32"),
        (lambda: tgd.dequantize(raw, t, out=torch.empty(4, 512)), "out must be"),
        (lambda: tgd.dequantize(raw, t, dtype=torch.float32, out=torch.empty(4, 511)),
         "out must be"),
        (lambda: tgd.dequantize(raw, t, values_per_program=768), "power of two"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    monkeypatch.setattr(tgd, "INTERPRET", False)
    with pytest.raises(ValueError, match="runs on CUDA tensors.*use gguf_ref.dequantize"):
        tgd.dequantize(raw, t)


def test_traced_through_custom_op():
    # torch.compile sees the custom op (its fake impl gives the shape), not the launch
    qtype = Q.IQ1_M
    raw = torch.from_numpy(_random_blocks(qtype, 17, 1, seed=6))
    x = torch.randn(2, 256)
    fn = torch.compile(lambda x, r: x @ tgd.dequantize(r, int(qtype), 256, torch.float32).t(),
                       backend="aot_eager", fullgraph=True)
    want = x @ gguf_ref.dequantize(raw, int(qtype)).t()
    assert torch.equal(fn(x, raw), want)


# ----------------------------------------------------------------------------- layer kernel
def test_kernel_choice():
    from quantrt.quant.ggml_kernels import (CpuGGMLKernel, DequantKernel, GGMLTensor,
                                            TritonDequantKernel, TritonG16Kernel,
                                            TritonWQKernel, pick_kernel)

    cuda = torch.device("cuda")   # can_implement only looks at the device type
    for qtype in TYPES:
        block, size = gguf_ref.block_info(qtype)
        w = GGMLTensor(torch.zeros(4, size, dtype=torch.uint8), int(qtype), (4, block))
        kernel, refused = pick_kernel(w, cuda, "auto")
        assert kernel is TritonDequantKernel, qtype.name
        reasons = dict(refused)   # what inspect shows: why the fused kernels refused
        assert f"{qtype.name} has no WQWeight layout" in reasons[TritonWQKernel.name]
        assert f"{qtype.name} has no 16-value sub-blocks" in reasons[TritonG16Kernel.name]
        assert "CPU only" in reasons[CpuGGMLKernel.name]
        assert pick_kernel(w, torch.device("cpu"), "auto")[0] is not TritonDequantKernel
        assert pick_kernel(w, cuda, "reference")[0] is DequantKernel
    q4 = GGMLTensor(torch.zeros(4, 18, dtype=torch.uint8), int(Q.Q4_0), (4, 32))
    assert pick_kernel(q4, cuda, "auto")[0] is TritonWQKernel   # fused types keep theirs
    assert TritonDequantKernel.can_implement(q4, cuda, "auto") == \
        (False, "Q4_0 has no Triton dequant kernel")
    assert "runs on CUDA GPUs only" in TritonDequantKernel.can_implement(
        q4, torch.device("cpu"), "auto")[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_kernel_matches_reference_kernel(dtype):
    # same weight bits, same F.linear: the outputs are equal, not just close
    from quantrt.quant.ggml_kernels import DequantKernel, GGMLTensor, TritonDequantKernel

    qtype, n, blocks = Q.IQ3_S, 17, 2
    dev = torch.device(_device())
    raw = torch.from_numpy(_random_blocks(qtype, n, blocks, seed=5))
    w = GGMLTensor(raw, int(qtype), (n, 256 * blocks)).to(dev)
    x = torch.randn(3, 256 * blocks, dtype=dtype, device=dev)
    y = TritonDequantKernel(w, dtype, dev)(x)
    assert y.dtype == dtype and y.shape == (3, n)
    assert torch.equal(y, DequantKernel(w, dtype, dev)(x))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gpu_bit_exact(qtype):
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for rows, blocks in SHAPES:
        run_case(qtype, rows, blocks, 31 * int(qtype) + rows, dtypes, "cuda",
                 values_per_program=SMALL_PROGRAM)
    # a real layer's size, several program sizes (the benchmark's --sweep candidates)
    for vpp in (256, 1024, tgd.VALUES_PER_PROGRAM, 8192):
        run_case(qtype, 301, 4096 // gguf_ref.block_info(qtype)[0], 7, dtypes, "cuda",
                 values_per_program=vpp)


@pytest.mark.gpu
def test_gpu_cuda_graph():
    from quantrt.quant.ggml_kernels import GGMLTensor, TritonDequantKernel

    raw = torch.from_numpy(_random_blocks(Q.IQ2_XS, 256, 4, seed=8))
    w = GGMLTensor(raw, int(Q.IQ2_XS), (256, 1024)).to(torch.device("cuda"))
    kern = TritonDequantKernel(w, torch.float16, torch.device("cuda"))
    x = torch.randn(4, 1024, device="cuda").half() * 1e-3
    ref = kern(x)   # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kern(x)
    x.copy_(torch.randn_like(x) * 1e-3)
    graph.replay()
    assert torch.equal(y, kern(x)) and not torch.equal(y, ref)


@pytest.mark.gpu
def test_gpu_gguf_model_reports_kernel(tmp_path):
    # a whole GGUF in MXFP4 (gguf-py writes it) loads on CUDA onto the new kernel and
    # gives the CPU reference's logits
    from quantrt.loader import load
    from tests.fixture_util import prompt_logits
    from tests.gguf_writer import convert_hf_to_gguf
    from tests.test_gguf_models import save_bpe_tokenizer
    from tests.tiny_models import make_tiny_model

    src = make_tiny_model(tmp_path / "hf", hidden_size=96, intermediate_size=160, seed=4)
    save_bpe_tokenizer(src)
    path = convert_hf_to_gguf(src, tmp_path / "m-mxfp4.gguf", "MXFP4")
    ref = load(path, device="cpu", kernels="reference", progress=False)
    gpu = load(path, device="cuda", dtype="float16", progress=False)
    kernels = {m.kernel_choice.name for m in gpu.model.layers.modules()
               if hasattr(m, "kernel_choice")}
    assert kernels == {"triton-dequant + F.linear (cuBLAS)"}
    ids = list(range(5, 30))
    assert (prompt_logits(gpu, ids) - prompt_logits(ref, ids)).abs().max().item() < 3e-2
