"""quant_kernels.fp8_act: per-token FP8 activation quantization.  The Triton kernel (CUDA
only) must give bit-identical fp8 values and scales to the torch expression it replaces;
on the CPU the torch path runs, checked here against a float64 recomputation."""
from __future__ import annotations

import pytest
import torch

from quant_kernels.fp8_act import E4M3_MAX, quant_per_token, quant_per_token_ref


@pytest.mark.parametrize("m,k,ub", [(1, 17, None), (17, 23, None), (23, 100, 0.5)])
def test_cpu_path_matches_definition(m, k, ub):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).bfloat16() * 3
    q, s = quant_per_token(x, ub)
    amax = x.double().abs().amax(-1, keepdim=True)
    if ub is not None:
        amax = amax.clamp(max=ub)
    assert torch.allclose(s.double(), (amax / E4M3_MAX).clamp(min=1e-12), rtol=1e-6)
    # dequantized values are within e4m3's half-ulp (2^-4 relative) of x, or saturated
    deq = q.double() * s.double()
    xs = x.double().clamp(-E4M3_MAX * s.double(), E4M3_MAX * s.double())
    assert ((deq - xs).abs() <= xs.abs() * 2 ** -4 + s.double() * 2 ** -9).all()


def test_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        quant_per_token(torch.randn(2, 3, 4))


@pytest.mark.gpu
# one pass up to ONE_PASS_MAX_K (8192), two passes of 2048 columns past it, ragged tails
@pytest.mark.parametrize("m,k,ub", [(1, 17, None), (17, 4096, None), (23, 100, 2.0),
                                    (4, 8192, None), (2, 8193, 1.0), (5, 14336, None),
                                    (3, 20000, None)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernel_is_exact(m, k, ub, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = (torch.randn(m, k, device="cuda") * 5).to(dtype)
    q, s = quant_per_token(x, ub)
    q2, s2 = quant_per_token_ref(x, ub)
    assert torch.equal(s, s2)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
