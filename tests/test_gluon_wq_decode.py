"""quant_kernels.gluon_wq_decode (the register-operand GEMM with decode tiles and split-K)
against wq_reference.

On the CPU: the candidate filter, refusals and what ``inspect`` says.  The ``gpu`` tests
run every decode config on odd shapes (M = 1..16, N past the last 64-row tile, K steps
not a multiple of the split, so splits are uneven), twice in a row (the split-K counters
must be re-armed by the first launch), every group size and fp16/bf16, into
NaN-poisoned outputs; and ``wq_matmul``'s timed choice with the kernel among its
candidates.  Tolerance as in test_triton_wq.
"""
from __future__ import annotations

import pytest
import torch

from quant_kernels import gluon_wq_decode as dec
from quant_kernels import gluon_wq_rs as rs
from tests.test_gluon_wq_gemm import run, run_groups
from tests.test_triton_wq import check, make_weight

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not (CUDA and rs.HAS_GLUON and torch.cuda.get_device_capability()
                              == (9, 0)), reason="needs an sm_90 GPU and Gluon")


def test_configs_are_decode_tiles():
    assert len({c.label for c in dec.DECODE_CONFIGS}) == len(dec.DECODE_CONFIGS)
    for c in dec.DECODE_CONFIGS:
        assert c.block_m == 16 and rs.fits(c), c.label
        assert rs.RSConfig.from_label(c.label) == c


@pytest.mark.parametrize("m,k", [(9, 4096), (16, 4096), (16, 64), (12, 130)])
def test_candidates(m, k):
    w = make_weight(64, k, 64 if k % 128 else 128, 4)
    got = dec.decode_candidates(torch.randn(m, k), w)
    steps = -(-k // 64)
    want = [c.label for c in dec.DECODE_CONFIGS if c.split <= steps]
    assert list(got) == want and bool(want) == (steps >= 2)   # every config splits K
    assert all(rs.RSConfig.from_label(lb).split <= steps for lb in got)


def test_refusals():
    w = make_weight(64, 256, 128, 4)
    for m in (17, 8, 1):
        ok, why = dec.can_run_decode(torch.randn(m, 256, dtype=torch.float16), w)
        assert not ok and f"M={m}" in why
    ok, why = dec.can_run_decode(torch.randn(9, 256, dtype=torch.float16), w)
    assert not ok and ("CUDA" in why or "Gluon" in why)       # on the CPU
    ok, why = dec.can_run_decode(torch.randn(9, 256, dtype=torch.float16),
                                 make_weight(64, 256, 128, 8))
    assert not ok and "4-bit only" in why


def test_inspect_names_the_decode_kernel(monkeypatch):
    from quantrt.quant.int_kernels import _decode_kernel
    monkeypatch.setattr(rs, "_ws_refusal", lambda w, device: "")
    assert "timed against the Gluon register-operand decode" in _decode_kernel(
        [make_weight(64, 256, 128, 4)], "cuda")
    assert "decode GEMM refused: 8-bit weight" in _decode_kernel(
        [make_weight(64, 256, 128, 8)], "cuda")


# M = 1 and 5 (the configs take them; wq_matmul sends them elsewhere), 9, 16; N past a
# 64/128-row tile; K of 10, 16, 33 and 65 steps (uneven splits, a partial last step)
DECODE_SHAPES = [(1, 136, 584), (5, 264, 1000), (9, 520, 2112), (16, 200, 4160)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cfg", dec.DECODE_CONFIGS, ids=lambda c: c.label)
@pytest.mark.parametrize("m,n,k", DECODE_SHAPES)
def test_configs(cfg, m, n, k):
    w = make_weight(n, k, 64 if k % 128 else 128, 4, device="cuda", seed=m + n + k)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    for _ in range(2):   # the second launch finds the counters the first re-armed
        run(x, w, cfg, rs.launch)


@pytest.mark.gpu
@gpu
def test_split_past_k_steps_refused():
    w = make_weight(64, 192, 64, 4, device="cuda")      # 3 steps of 64
    x = torch.randn(1, 192, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="split 4 of K=192"):
        rs.launch(x, w, torch.empty(1, 64, dtype=torch.float16, device="cuda"),
                  rs.RSConfig(16, 64, 4, 4, 4, 4))
    assert list(dec.decode_candidates(x, w)) == ["rs16x64w4s8k3c3", "rs16x128w4s6k2c2"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("g", [64, 128, 256, "K"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_groups_dtypes(g, dtype):
    run_groups(g, 4, dtype, 11, dec.DECODE_CONFIGS, rs.launch)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [9, 16])
def test_wq_matmul_times_it(m):
    from quant_kernels import triton_wq
    w = make_weight(1024, 2048, 128, 4, device="cuda", seed=m)
    x = torch.randn(m, 2048, dtype=torch.float16, device="cuda")
    check(x, w, out=lambda x, w, o: triton_wq.wq_matmul(x, w, out=o))
    keys = [k for k in triton_wq._CHOICE if "rs" in k[0] and k[2:4] == (1024, 2048)]
    assert keys, "the decode GEMM was not among wq_matmul's timed candidates"
    check(x, w, out=lambda x, w, o: dec.decode_matmul(x, w, o))
