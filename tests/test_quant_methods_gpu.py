"""The golden fixtures on the GPU: integer formats run the fused Triton kernel (fp16 and bf16
activations; HQQ's down_proj, regrouped to 16 columns, is refused for its group size and runs
the reference) and still match the reference library's logits.

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
    fused = "triton-wq (fused dequant-matmul)"
    choices = [m.kernel_choice for m in lm.model.layers.modules() if hasattr(m, "kernel_choice")]
    assert any(c.name.startswith(fused) for c in choices)
    for c in choices:  # M > 16: the Gluon GEMM is timed, or its refusal is given
        if c.name.startswith(fused):
            assert ("timed against the Gluon" in c.name
                    or "Gluon warp-specialized GEMM refused: " in c.name), c.name
    for c in choices:  # any other layer says why the fused kernel refused it
        if not c.name.startswith(fused):
            assert "group size" in dict(c.refused)[fused], (name, c.describe())
    for b, row in enumerate(fx.reference["input_ids"]):
        got = prompt_logits(lm, row.tolist())
        err = (got - fx.reference["logits"][b]).abs().max().item()
        assert err < TOL[dtype], (name, err)
