"""formats.awq: GEMM/GEMV round trips, AWQ_ORDER word layout, malformed input, fixtures."""

import pytest
import torch

from formats import awq
from quantrt.errors import FormatError
from tests.fixture_util import fixture_dirs, load_fixture


def _layer(k, n, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    g = k if group_size == -1 else group_size
    n_groups = -(-k // g)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (n_groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n_groups, n, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    return q, zeros, scales


@pytest.mark.parametrize("version", ["gemm", "gemv"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("k,n", [(96, 1376), (1376, 24), (256, 8)])
def test_round_trip(k, n, group_size, version):
    q, zeros, scales = _layer(k, n, group_size, seed=k + n + group_size)
    qweight, qzeros, s = awq.pack(q, zeros, scales, 4, group_size, version)
    if version == "gemm":
        assert qweight.shape == (k, n // 8) and qzeros.shape == (zeros.shape[0], n // 8)
    else:
        width = awq.calculate_zeros_width(k, group_size)
        assert qweight.shape == (n, k // 8) and qzeros.shape == (n, width)
        assert s.shape == (n, 8 * width) and (s[:, zeros.shape[0]:] == 0).all()
    uq, uz, us = awq.unpack(qweight, qzeros, s, 4, group_size, version)
    assert torch.equal(uq, q) and torch.equal(uz, zeros) and torch.equal(us, scales)
    again = awq.pack(uq, uz, us, 4, group_size, version)
    assert all(torch.equal(a, b) for a, b in zip(again, (qweight, qzeros, s)))
    w = awq.dequantize(qweight, qzeros, s, 4, group_size, version)
    g = k if group_size == -1 else group_size
    rows = torch.arange(k) // g
    ref = ((q - zeros[rows]).float() * scales.float()[rows]).t().half()
    assert w.shape == (n, k) and torch.equal(w, ref)


def test_gemm_word_uses_awq_order():
    # columns 0..7 hold 0..7; AWQ_ORDER puts columns 0,2,4,6,1,3,5,7 in nibbles 0..7
    q = torch.arange(8, dtype=torch.int32)[None].repeat(64, 1)
    qweight, qzeros, _ = awq.pack(q, q[:1], torch.ones(1, 8), 4, -1, "gemm")
    assert (qweight == 0x75316420).all() and (qzeros == 0x75316420).all()
    # GEMV keeps plain order along K
    qv, _, _ = awq.pack(torch.arange(8, dtype=torch.int32)[:, None].repeat(1, 8),
                        torch.zeros(1, 8, dtype=torch.int32), torch.ones(1, 8), 4, -1, "gemv")
    assert (qv == 0x76543210).all()


def test_calculate_zeros_width_matches_autoawq_rule():
    assert awq.calculate_zeros_width(4096, 128) == 4
    assert awq.calculate_zeros_width(4096, 64) == 8
    assert awq.calculate_zeros_width(256, 64) == 2  # 4 groups -> 1 word -> multiple of 2
    assert awq.calculate_zeros_width(96, 32) == 4
    assert awq.calculate_zeros_width(11008, 128) == 11  # 86 groups -> 11 words
    with pytest.raises(FormatError, match="group_size 48"):
        awq.calculate_zeros_width(96, 48)


def test_malformed_inputs():
    q, zeros, scales = _layer(128, 64, 32, seed=0)
    qw, qz, s = awq.pack(q, zeros, scales, 4, 32, "gemm")
    with pytest.raises(FormatError, match="scales.*expected \\(4, 64\\)"):
        awq.unpack(qw, qz, s[:3], 4, 32, "gemm")
    with pytest.raises(FormatError, match="qzeros.*expected \\(4, 8\\)"):
        awq.unpack(qw, qz[:, :7], s, 4, 32, "gemm")
    with pytest.raises(FormatError, match="qweight.*expected \\(128, 8\\)"):
        awq.unpack(qw[:, :7], qz, s, 4, 32, "gemm")
    with pytest.raises(FormatError, match="only 4-bit"):
        awq.unpack(qw, qz, s, 3, 32, "gemm")
    with pytest.raises(FormatError, match="version"):
        awq.unpack(qw, qz, s, 4, 32, "marlin")
    qv, qzv, sv = awq.pack(q, zeros, scales, 4, 32, "gemv")
    with pytest.raises(FormatError, match="calculate_zeros_width"):
        awq.unpack(qv, qzv[:, :3], sv, 4, 32, "gemv")
    with pytest.raises(FormatError, match="multiple of 8"):
        awq.pack(q[:, :60], zeros[:, :60], scales[:, :60], 4, 32, "gemm")


@pytest.mark.parametrize("fixture_dir", fixture_dirs("awq"), ids=lambda p: p.name)
def test_golden_fixtures(fixture_dir):
    fx = load_fixture(fixture_dir)
    group = fx.quant_config.get("group_size", fx.quant_config.get("q_group_size"))
    version = str(fx.quant_config["version"]).lower()
    refs = fx.dequant_refs()
    assert group and refs, f"{fx.name}: needs group_size and a dequant.<module> reference"
    for mod, want in refs.items():
        t = fx.module_tensors(mod)
        # AutoAWQ dequantizes in fp16; the reference stores that as float32
        w = awq.dequantize(t["qweight"], t["qzeros"], t["scales"], 4, group, version,
                           in_features=want.shape[1]).to(want.dtype)
        assert torch.equal(w, want), f"{fx.name}: {mod} differs"
