"""quant_kernels.gluon_wq_rs (the register-A Gluon GEMM) against wq_reference.

On the CPU: config validation, refusals, and the per-lane dequant PTX (tests/ptx_interp),
including that thread t of wgmma's A fragment gets columns 8c + 2t, 8c + 2t + 1 of the
natural packed layout.  The ``gpu`` tests run every config on odd shapes (rows past M
and N, K not a multiple of 64, several M and N tiles), every group size the kernel
takes and fp16/bf16, into NaN-poisoned outputs.  Tolerance as in test_triton_wq.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quant_kernels import gluon_wq_rs as rs
from tests.test_gluon_wq_gemm import ODD_SHAPES, run_groups, run_odd_shape
from tests.test_triton_wq import make_weight

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not (CUDA and rs.HAS_GLUON and torch.cuda.get_device_capability()
                              == (9, 0)), reason="needs an sm_90 GPU and Gluon")


@pytest.mark.parametrize("args,match", [
    ((96, 64, 4, 4), "block_m=96"), ((64, 64, 2, 4), "4 or 8"),
    ((64, 64, 8, 4), "at least 16 per warp"), ((64, 96, 4, 4), "block_n=96"),
    ((256, 128, 4, 4), "256 accumulator registers"), ((64, 64, 4, 13), "ring slots"),
    ((128, 64, 4, 4, 3), "ctas=3"), ((256, 64, 4, 4, 2), "ctas=2"),
    ((16, 64, 4, 4, 5), "ctas=5"), ((16, 64, 4, 4, 1, 5), "split=5"),
    ((4, 64, 4, 4), "block_m=4")])
def test_config_validation(args, match):
    with pytest.raises(ValueError, match=match):
        rs.RSConfig(*args)


def test_config_labels_and_budget():
    assert all(rs.RSConfig.from_label(c.label) == c for c in rs.CONFIGS)
    assert rs.RSConfig.from_label("rs16x64w4s8k4c2") == rs.RSConfig(16, 64, 4, 8, 2, 4)
    for bad in ("128x128w8s4", "rs16x64w4s8c2k4", "rs16x64w4"):   # ws label, order, short
        with pytest.raises(ValueError, match="expected rs"):
            rs.RSConfig.from_label(bad)
    assert all(rs.fits(c) for c in rs.CONFIGS)
    assert not rs.fits(rs.RSConfig(128, 128, 8, 6, ctas=2))   # 2 x 127 KiB > an SM's 228
    assert rs.RSConfig(128, 128, 8, 4).smem_bytes() == 4 * (16384 + 4096 + 512) + 4096


@pytest.mark.parametrize("n,k,g,bits,match", [
    (64, 256, 128, 8, "4-bit only"), (64, 256, 32, 4, "group 32"), (20, 128, 128, 4, "N % 8")])
def test_refusals(n, k, g, bits, match):
    w = make_weight(n, k, g, bits)
    ok, why = rs.can_run(torch.randn(3, k), w)
    assert not ok and "fp16 or bf16" in why
    ok, why = rs.can_run(torch.randn(3, k, dtype=torch.float16), w)
    assert not ok and match in why


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_ptx_lane_pairs(kind):
    # every lane t of a quad turns byte t of a word (values 2t, 2t + 1 of its 8) into
    # the pair q * s + b, each rounded once: the A fragment's columns 8c + 2t, 8c + 2t + 1
    from tests.ptx_interp import half_value, round16, run_ptx
    asm = rs._ptx_pair(kind == "bf16")
    assert len(rs._PTX_CONSTRAINTS.split(",")) == 7
    rng = np.random.default_rng(len(kind))
    for _ in range(100):
        q = rng.integers(0, 16, 8)
        word = sum(int(v) << 4 * j for j, v in enumerate(q))
        sc, bi = round16(rng.uniform(1e-3, 0.1), kind), round16(rng.uniform(-1, 1), kind)
        for t in range(4):
            sel = 0x4040 | t << 8 | t
            regs = run_ptx(asm, {"$1": word, "$2": word, "$3": sc | sc << 16,
                                 "$4": bi | bi << 16, "$5": sel, "$6": sel})
            want = [round16(q[p] * half_value(sc, kind) + half_value(bi, kind), kind)
                    for p in (2 * t, 2 * t + 1)]
            assert regs["$0"] == want[0] | want[1] << 16, (t, q)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cfg", rs.CONFIGS, ids=lambda c: c.label)
@pytest.mark.parametrize("m,n,k", ODD_SHAPES)
def test_configs(cfg, m, n, k):
    run_odd_shape(cfg, rs.launch, m, n, k)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("g", [64, 128, 256, "K"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_groups_dtypes(g, dtype):
    run_groups(g, 4, dtype, 200, (rs.CONFIGS[0], rs.CONFIGS[-1]), rs.launch)


def test_inspect_names_both_gluon_kernels(monkeypatch):
    # what `quantrt inspect` shows for M > 16 where the Gluon GEMMs run (faked on the CPU):
    # both for 4-bit, and why the register-operand one is refused for 8-bit
    from quant_kernels import gluon_wq_gemm as ws
    from quantrt.quant.int_kernels import _mid_m_kernel
    monkeypatch.setattr(ws, "weight_refusal", lambda w, device: "")
    monkeypatch.setattr(rs, "_ws_refusal", lambda w, device: "")
    assert "register-operand)" in _mid_m_kernel([make_weight(64, 256, 128, 4)], "cuda")
    why = _mid_m_kernel([make_weight(64, 256, 128, 8)], "cuda")
    assert "register-operand GEMM refused: 8-bit weight" in why
