"""The golden fixtures on the GPU: integer formats run the fused Triton kernel (fp16 and bf16
activations) and still match the reference library's logits.

Tolerance 0.06 (logits span ~7): fp16/bf16 activations and fp16 scale+bias form, against the
libraries' own fp16 forwards; the fp32 reference path on CPU is within 5e-3.
"""
from __future__ import annotations

import pytest
import torch

from tests.fixture_util import FIXTURES, load_fixture, prompt_logits
from tests.test_quant_methods import NAMES

pytestmark = pytest.mark.gpu
INT_FIXTURES = [n for n in NAMES if n.startswith(("awq_", "gptq_", "marlin_", "ct_w", "hqq_"))]
TOL = {torch.float16: 0.06, torch.bfloat16: 0.15}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", INT_FIXTURES)
def test_fused_kernel_matches_reference_library(name, dtype):
    from quantrt.loader import load

    fx = load_fixture(FIXTURES / name)
    lm = load(FIXTURES / name, device="cuda", dtype=dtype, progress=False)
    kernels = {m.kernel_choice.name for m in lm.model.layers.modules() if hasattr(m, "kernel_choice")}
    assert kernels == {"triton-wq (fused dequant-matmul)"}, kernels
    for b, row in enumerate(fx.reference["input_ids"]):
        got = prompt_logits(lm, row.tolist())
        err = (got - fx.reference["logits"][b]).abs().max().item()
        assert err < TOL[dtype], (name, err)
