"""quant_kernels.gluon_wq_gemm (the warp-specialized mid-M GEMM) against wq_reference.

Gluon kernels do not run under TRITON_INTERPRET: on the CPU these tests check the config
validation, ``can_run``'s refusals and the dequant PTX (tests/ptx_interp); the ``gpu``
tests run every config on odd shapes (rows past M and N, K not a multiple of the
64-column tile, one and several M/N tiles), every group size the kernel takes, 4/8-bit,
fp16/bf16, into NaN-poisoned outputs.
Tolerance as in test_triton_wq (||out - ref|| / ||ref||: 2e-3 fp16, 1e-2 bf16).
"""
from __future__ import annotations

import pytest
import torch

from quant_kernels import gluon_wq_gemm as ws
from tests.test_triton_wq import TOL, check, make_weight, rel_err
from quant_kernels.wq_layout import wq_reference

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not (CUDA and ws.HAS_GLUON and torch.cuda.get_device_capability()
                              == (9, 0)), reason="needs an sm_90 GPU and Gluon")


@pytest.mark.parametrize("args,match", [
    ((96, 128, 4, 4), "BM in"), ((128, 32, 4, 4), "BN in"), ((128, 256, 8, 3), "BN in"),
    ((64, 128, 8, 4), "at least 16 rows"), ((128, 128, 2, 4), "4 or 8 warps"),
    ((128, 128, 4, 1), "ring slots")])
def test_config_validation(args, match):
    with pytest.raises(ValueError, match=match):
        ws.WSConfig(*args)


def test_config_labels():
    assert all(ws.WSConfig.from_label(c.label) == c for c in ws.CONFIGS)
    with pytest.raises(ValueError, match="expected BMxBN"):
        ws.WSConfig.from_label("128x128")
    with pytest.raises(ValueError, match="BN in"):
        ws.WSConfig.from_label("128x256w8s3")


def test_shared_memory_budget():
    # every candidate fits at 4 and 8 bits; a deeper ring is skipped, not launched to fail
    for bits in (4, 8):
        w = make_weight(8, 128, 128, bits)
        assert all(ws._fits(cfg, w) for cfg in ws.CONFIGS)
        assert not ws._fits(ws.WSConfig(256, 128, 8, 5), w)
    assert ws.WSConfig(128, 128, 4, 4).smem_bytes(4) == 4 * (16384 + 16384 + 4096 + 512) + 512


@pytest.mark.parametrize("n,k,g,bits,dtype,match", [
    (64, 128, 32, 4, torch.float16, "group 32"),                  # GGUF Q4_0-style groups
    (20, 128, 128, 4, torch.float16, "N % 8"),                    # TMA row alignment
    (64, 136, "K", 4, torch.float16, "K % 32"),
    (64, 128, 128, 4, torch.bfloat16, None),                      # fine, but on the CPU
])
def test_can_run_refusals(n, k, g, bits, dtype, match):
    w = make_weight(n, k, g, bits, dtype=dtype)
    x = torch.randn(3, k, dtype=dtype)
    ok, why = ws.can_run(x, w)
    assert not ok
    if match is not None:
        assert match in why
    else:
        assert "CUDA" in why or "Gluon" in why
    ok, why = ws.can_run(x.float(), w)
    assert not ok and "fp16 or bf16" in why


def run(x, w, cfg, launch=ws.launch):
    """One launch of ``cfg`` into a NaN-poisoned output, checked against the reference."""
    check(x, w, out=lambda x, w, o: launch(x, w, o, cfg))


# rows past M and N, K not a multiple of the 64-column tile, one and several M/N tiles
ODD_SHAPES = [(1, 136, 320), (77, 264, 1000), (300, 520, 2112)]


def run_odd_shape(cfg, launch, m, n, k):
    """``cfg`` on a fresh 4-bit fp16 weight of an odd shape (groups of 128, or 64 where K
    is not a multiple of 128)."""
    w = make_weight(n, k, 64 if k % 128 else 128, 4, device="cuda", seed=m + n + k)
    run(torch.randn(m, k, dtype=torch.float16, device="cuda"), w, cfg, launch)


def run_groups(g, bits, dtype, m, cfgs, launch=ws.launch):
    """``cfgs`` on one fresh weight with group ``g`` (392 x 1536: rows past the last tile)
    and ``m`` activation rows in ``dtype`` (shared with the rs and decode tests)."""
    n, k = 392, 1536
    w = make_weight(n, k, g, bits, dtype=dtype, device="cuda", seed=bits + k)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    for cfg in cfgs:
        run(x, w, cfg, launch)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cfg", ws.CONFIGS, ids=lambda c: c.label)
@pytest.mark.parametrize("m,n,k", ODD_SHAPES)
def test_configs(cfg, m, n, k):
    run_odd_shape(cfg, ws.launch, m, n, k)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("g", [64, 128, 256, "K"])
@pytest.mark.parametrize("bits,dtype", [(4, torch.float16), (4, torch.bfloat16),
                                        (8, torch.float16), (8, torch.bfloat16)])
def test_groups_bits_dtypes(g, bits, dtype):
    run_groups(g, bits, dtype, 200, (ws.CONFIGS[0], ws.CONFIGS[-1]))


@pytest.mark.gpu
@gpu
def test_ws_matmul_tunes_once_per_bucket():
    from quant_kernels.triton_wq_tile import CHOICES
    w = make_weight(256, 512, 128, 4, device="cuda", seed=5)
    labels = tuple(ws.candidates(torch.empty(130, 512, dtype=torch.float16, device="cuda"), w))
    assert any(lb.startswith("rs") for lb in labels)   # 4-bit: the register-A kernel too
    for m in (130, 200):  # one M bucket (256): timed once
        check(torch.randn(m, 512, dtype=torch.float16, device="cuda"), w,
              out=lambda x, w, o: ws.ws_matmul(x, w, o))
    picks = [v for key, v in CHOICES.items() if key[0] == labels and key[2:4] == (256, 512)]
    assert len(picks) == 1 and picks[0] in labels


@pytest.mark.gpu
@gpu
def test_dispatch_act_order_under_graph(monkeypatch):
    # wq_matmul's mid-M path with this kernel forced: act-order columns permuted first,
    # launched from a CUDA graph after the eager (tuning) call
    from quant_kernels import triton_wq as tw
    monkeypatch.setattr(tw, "_timed_choice", lambda x, w, out, fns, cap, fallback:
                        "ws" if "ws" in fns else fallback)
    w = make_weight(384, 1024, 128, 4, perm=True, device="cuda", seed=9)
    x = torch.randn(300, 1024, dtype=torch.float16, device="cuda")
    tw.wq_matmul(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tw.wq_matmul(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(y, wq_reference(x, w)) < TOL[torch.float16]


def test_inspect_names_the_mid_m_kernel():
    # TritonWQKernel's choice name (shown by `quantrt inspect`) says why the Gluon GEMM is
    # refused for M > 16; on the CPU it always is
    from quantrt.quant.int_kernels import _mid_m_kernel
    assert "group 32: a 64-column K tile" in _mid_m_kernel([make_weight(64, 256, 32, 4)], "cpu")
    assert "need a CUDA device" in _mid_m_kernel([make_weight(64, 256, 128, 4)], "cpu")


@pytest.mark.parametrize("bits,kind", [(4, "f16"), (4, "bf16"), (8, "f16")])
def test_ptx_natural_order_recipes(bits, kind):
    # the dequant warps' PTX on the CPU (tests/ptx_interp): one word's values in natural
    # K order, pair j = values (2j, 2j + 1), each q * s + b rounded once; the register
    # numbering follows the constraint string's operand count
    import numpy as np
    from tests.ptx_interp import half_value, round16, run_ptx
    asm, pack = ws._ptx_nat(bits, kind == "bf16"), 32 // bits
    assert len(ws._ptx_constraints(bits).split(",")) == pack // 2 + 3 * pack
    rng = np.random.default_rng(bits + len(kind))
    for _ in range(200):
        q = rng.integers(0, 1 << bits, pack)
        sc = round16(rng.uniform(1e-3, 0.1), kind)
        bi = round16(rng.uniform(-1, 1), kind)
        regs = {f"${pack // 2 + i}": sum(int(v) << bits * j for j, v in enumerate(q))
                for i in range(pack)}                       # the word, broadcast
        regs.update({f"${3 * pack // 2 + i}": sc | sc << 16 for i in range(pack // 2)})
        regs.update({f"${2 * pack + i}": bi | bi << 16 for i in range(pack // 2)})
        regs = run_ptx(asm, regs)
        for j in range(pack // 2):
            want = [round16(q[p] * half_value(sc, kind) + half_value(bi, kind), kind)
                    for p in (2 * j, 2 * j + 1)]
            assert regs[f"${j}"] == want[0] | want[1] << 16, (j, q)
