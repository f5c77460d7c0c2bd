"""GGUF block types repacked for the fused integer kernels (quant_kernels/gguf_wq.py): the
repacked weight equals gguf-py-exact dequantization up to the fp16/bf16 rounding of the
per-group scale and bias, on random blocks of every supported type; the Triton kernel
(interpreted on CPU) then matches a dense GEMM; on the GPU a GGUF model runs on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from quant_kernels import gguf_ref, gguf_wq
from quant_kernels.wq_layout import dequantize_wq

# fp16 fields that hold scales (d, dmin) per type: random bytes there could be inf/nan
SCALE_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
                Q.Q4_K: [0, 2], Q.Q5_K: [0, 2]}


def random_blocks(qtype: Q, n: int, k: int, seed: int) -> torch.Tensor:
    """Random bytes for every block, with finite small fp16 scales."""
    block, size = gguf_wq.TYPE_SIZE[qtype]
    g = np.random.default_rng(seed)
    raw = g.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        raw[:, off:off + 2] = g.uniform(1e-3, 2e-2, size=raw.shape[0]).astype(np.float16) \
            .view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1))


@pytest.mark.parametrize("qtype", gguf_wq.SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_repacked_weight_equals_reference(qtype, dtype):
    n, k = 23, 512
    raw = random_blocks(qtype, n, k, seed=int(qtype))
    want = gguf_ref.dequantize(raw, qtype, (n, k))
    got = dequantize_wq(gguf_wq.to_wq(raw, qtype, k, dtype))
    # |w| <= |d| * 255 * 63 here; the scale/bias rounding is ~2^-9 (bf16) relative
    tol = 2 ** (-9 if dtype == torch.bfloat16 else -11) * 2 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol


def test_unsupported_type_is_refused():
    with pytest.raises(ValueError, match="Q6_K has no WQ layout"):
        gguf_wq.to_wq(torch.zeros(1, 210, dtype=torch.uint8), Q.Q6_K, 256, torch.float16)
    with pytest.raises(ValueError, match="uint8"):
        gguf_wq.to_wq(torch.zeros(1, 17, dtype=torch.uint8), Q.Q4_0, 32, torch.float16)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q4_K], ids=lambda t: t.name)
def test_fused_kernel_interpreted(qtype):
    from quant_kernels.triton_wq import HAS_TRITON, INTERPRET, wq_matmul

    if not (HAS_TRITON and INTERPRET):
        pytest.skip("needs Triton in interpreter mode")
    n, k = 17, 256
    raw = random_blocks(qtype, n, k, seed=3)
    w = gguf_wq.to_wq(raw, qtype, k, torch.float16)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1)).half()
    want = x.float() @ dequantize_wq(w).t()
    got = wq_matmul(x, w).float()
    assert (got - want).abs().max().item() < 2e-2 * want.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_gguf_model_on_fused_kernel(tmp_path, qtype):
    from quantrt.loader import load
    from tests.fixture_util import prompt_logits
    from tests.gguf_writer import convert_hf_to_gguf
    from tests.test_gguf_models import save_bpe_tokenizer
    from tests.tiny_models import make_tiny_model

    src = make_tiny_model(tmp_path / "hf", hidden_size=96, intermediate_size=160, seed=4)
    save_bpe_tokenizer(src)  # a gpt2 GGUF vocabulary needs BPE merges
    path = convert_hf_to_gguf(src, tmp_path / f"m-{qtype}.gguf", qtype)
    ref = load(path, device="cpu", kernels="reference", progress=False)
    gpu = load(path, device="cuda", dtype="float16", progress=False)
    kernels = {m.kernel_choice.name for m in gpu.model.layers.modules() if hasattr(m, "kernel_choice")}
    assert kernels == {"triton-wq (fused dequant-matmul)"}
    ids = list(range(5, 30))
    assert (prompt_logits(gpu, ids) - prompt_logits(ref, ids)).abs().max().item() < 3e-2
