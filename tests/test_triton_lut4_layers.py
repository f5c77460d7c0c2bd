"""quantrt.quant.lut_kernels.TritonLut4Kernel: bitsandbytes NF4/FP4 layers (fused q/k/v or
gate/up shards, double quant, storage dtypes, the reference fixtures) through the fused
code-book kernel, against the torch expansion kernel (``Lut4Kernel``), and its refusal
reasons.  On a CPU-only machine the kernel is built on the CPU directly (its
``can_implement`` allows CUDA only) and runs under TRITON_INTERPRET=1.

Tolerance: both kernels round every weight as bitsandbytes does (its own dtype, then
x's); Lut4Kernel's F.linear on fp32 activations is the oracle, so the fused kernel
differs by the fp16 output's rounding and the summation order: < 1e-3 relative (2^-11);
for bf16 < 1e-2 (2^-8 rounding; the interpreter truncates its bf16 casts, weights included,
which test_triton_lut4 checks exactly).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from formats import bnb as bnb_format  # noqa: E402
from quantrt.quant.bnb import BitsAndBytesConfig, BnbParams  # noqa: E402
from quantrt.quant.lut_kernels import LUT4_KERNELS, Lut4Kernel, TritonLut4Kernel  # noqa: E402
from tests.fixture_util import FIXTURES, load_fixture, prompt_logits  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.device("cuda")  # only its type is read by can_implement
TOL = 1e-3


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _quant_linear(qc, cols, rows, params_dtype, name="model.layers.0.mlp.fused_proj",
                  shard_names=None):
    from quantrt.models.layers import QuantLinear

    qc.policy = "auto"
    return QuantLinear(cols, rows, bias=False, quant_config=qc, prefix=name,
                       params_dtype=params_dtype,
                       shard_names=shard_names or [f"part{i}_proj" for i in range(len(rows))])


def bnb_layer(cols, rows, quant_type="nf4", double_quant=True, storage="uint8",
              blocksizes=None, wdtypes=None, params_dtype=torch.float16, seed=0):
    """A fused two-shard QuantLinear loaded with bitsandbytes tensors of random weights."""
    gen = torch.Generator().manual_seed(seed)
    qc = BitsAndBytesConfig(BnbParams(4, quant_type, double_quant, quant_storage=storage))
    layer = _quant_linear(qc, cols, rows, params_dtype)
    for shard, n in enumerate(rows):
        bs = (blocksizes or [64] * len(rows))[shard]
        wdt = (wdtypes or [torch.float16] * len(rows))[shard]
        sd = bnb_format.quantize_4bit((torch.randn(n, cols, generator=gen) * (shard + 1)).to(wdt),
                                      quant_type, bs, double_quant,
                                      storage=getattr(torch, storage))
        for name, t in sd.items():
            layer.load(name, t, shard)
    return layer


def check_against_expansion(layer, m=3):
    cpu = torch.device("cpu")
    fast = TritonLut4Kernel(layer.method, layer, cpu)  # what can_implement allows on CUDA
    want = Lut4Kernel(layer.method, layer, cpu)
    x = torch.randn(m, layer.input_size)
    for dtype in (torch.float16, torch.bfloat16):
        got = fast(x.to(dtype))
        assert got.dtype == dtype and got.shape == (m, sum(layer.output_sizes))
        # the weights rounded as bitsandbytes does (their dtype, then x's), fp32 math
        ref = torch.nn.functional.linear(x.to(dtype).float(),
                                         torch.cat([p.weight(dtype) for p in want.parts]).float())
        # bf16 anywhere (x, or a weight's own dtype under the interpreter): 2^-8 steps
        bf16 = dtype == torch.bfloat16 or (INTERPRET and any(p.wdtype == torch.bfloat16
                                                             for p in fast.parts))
        assert rel_err(got, ref) < (1e-2 if bf16 else TOL)
    return fast


@pytest.mark.parametrize("quant_type,double_quant,storage,m", [
    ("nf4", True, "uint8", 1), ("fp4", False, "uint8", 3),
    ("nf4", False, "bfloat16", 17), ("fp4", True, "float32", 1)])
def test_fused_shards_match_the_expansion_kernel(quant_type, double_quant, storage, m):
    layer = bnb_layer(128, [48, 17], quant_type, double_quant, storage)
    fast = check_against_expansion(layer, m)
    assert len(fast.parts) == 1 and fast.parts[0].n == 65  # one matmul for both shards
    assert fast.tensors() == [fast.parts[0].codes, fast.parts[0].absmax, fast.parts[0].lut]


def test_shards_that_differ_run_as_separate_matmuls():
    layer = bnb_layer(256, [32, 23, 9], blocksizes=[64, 128, 128],
                      wdtypes=[torch.float16, torch.float16, torch.bfloat16])
    fast = check_against_expansion(layer, 2)
    assert [p.n for p in fast.parts] == [32, 23, 9]
    assert [(p.blocksize, p.wdtype) for p in fast.parts] == \
        [(64, torch.float16), (128, torch.float16), (128, torch.bfloat16)]


@pytest.mark.parametrize("make,device,why", [
    (lambda: bnb_layer(128, [16, 8]), torch.device("cpu"),
     "runs on CUDA GPUs only (device is cpu)"),
    (lambda: bnb_layer(100, [16, 8]), CUDA,
     "K=100 is not a multiple of the block size 64: absmax blocks straddle weight rows"),
    (lambda: bnb_layer(96, [16, 8], blocksizes=[64, 48]), CUDA,
     "K=96 is not a multiple of the block size 64"),
    (lambda: bnb_layer(96, [16, 8], blocksizes=[48, 48]), CUDA,
     "block size 48 is not a multiple of 32"),
    (lambda: bnb_layer(128, [16, 8], params_dtype=torch.float32), CUDA,
     "needs float16/bfloat16 activations, not torch.float32"),
])
def test_refusal_reasons(make, device, why):
    layer = make()
    ok, reason = TritonLut4Kernel.can_implement(layer.method, layer, device, "auto")
    assert not ok and reason.startswith(why), reason
    assert TritonLut4Kernel.can_implement(layer.method, layer, CUDA, "reference") == \
        (False, "reference kernels requested")


def test_kernel_order_and_inspect_reason():
    assert LUT4_KERNELS.index(TritonLut4Kernel) < LUT4_KERNELS.index(Lut4Kernel)
    layer = bnb_layer(128, [16, 8])
    assert TritonLut4Kernel.can_implement(layer.method, layer, CUDA, "auto") == (True, "")
    layer.process_weights_after_loading(torch.device("cpu"))
    assert layer.kernel_choice.name == Lut4Kernel.name
    assert dict(layer.kernel_choice.refused)[TritonLut4Kernel.name] == \
        "runs on CUDA GPUs only (device is cpu)"


@pytest.mark.parametrize("name", ["bnb_nf4_dq", "bnb_fp4"])
def test_reference_fixture_layers(name):
    """The bitsandbytes-written fixtures: layer 0's q/k/v (K = 128, one fused matmul)
    through the fused kernel; down_proj (K = 336, blocks of 64 straddle rows) refused."""
    fx = load_fixture(FIXTURES / name)
    qc = BitsAndBytesConfig(BnbParams(4, fx.quant_config["bnb_4bit_quant_type"],
                                      fx.quant_config["bnb_4bit_use_double_quant"]))
    layer = _quant_linear(qc, 128, [128, 64, 64], torch.float16,
                          "model.layers.0.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"])
    for shard, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        for key, t in fx.module_tensors(f"model.layers.0.self_attn.{proj}").items():
            layer.load(key, t, shard)
    fast = check_against_expansion(layer, 5)
    assert len(fast.parts) == 1
    down = _quant_linear(qc, 336, [128], torch.float16, "model.layers.1.mlp.down_proj",
                         ["down_proj"])
    for key, t in fx.module_tensors("model.layers.1.mlp.down_proj").items():
        down.load(key, t, 0)
    ok, why = TritonLut4Kernel.can_implement(down.method, down, CUDA, "auto")
    assert not ok and "K=336 is not a multiple of the block size 64" in why


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bnb_nf4_dq", "bnb_fp4"])
def test_gpu_fixture_model_matches_the_library(name):
    """Loaded on CUDA: the K = 128 layers take the fused kernel, down_proj the expansion one;
    logits within the tolerance test_quant_bnb uses for the expansion kernel alone."""
    from quantrt.loader import load

    lm = load(FIXTURES / name, kernels="auto", device="cuda", dtype="float16", progress=False)
    layer0 = lm.model.layers[0]
    assert layer0.self_attn.qkv_proj.kernel_choice.name == TritonLut4Kernel.name
    assert layer0.mlp.gate_up_proj.kernel_choice.name == TritonLut4Kernel.name
    assert layer0.mlp.down_proj.kernel_choice.name == Lut4Kernel.name
    ref = load_fixture(FIXTURES / name).reference
    for b, row in enumerate(ref["input_ids"]):
        assert (prompt_logits(lm, row.tolist()) - ref["logits"][b]).abs().max() < 0.06


@pytest.mark.gpu
def test_gpu_layer_matches_the_expansion_kernel():
    layer = bnb_layer(4096, [1024, 512], seed=3)
    fast = TritonLut4Kernel(layer.method, layer, CUDA)
    want = Lut4Kernel(layer.method, layer, CUDA)
    for m in (1, 4, 16, 64, 1024):
        x = torch.randn(m, 4096, device="cuda")
        dense = torch.cat([p.weight(torch.float16) for p in want.parts]).float()
        ref = torch.nn.functional.linear(x.half().float(), dense)
        assert rel_err(fast(x.half()), ref) < TOL
