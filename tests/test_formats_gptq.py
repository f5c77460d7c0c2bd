"""formats.gptq: round trips, AutoGPTQ-style packing spec, malformed input, fixtures."""

import numpy as np
import pytest
import torch

from formats import gptq
from quant_kernels.int_ref import rtn_quantize
from quantrt.errors import FormatError
from tests.fixture_util import fixture_dirs, load_fixture

SHAPES = [(1376, 24), (23, 96), (96, 17)]  # (K, N): partial groups, N not a word multiple


def _random_layer(k, n, bits, group_size, desc_act, sym, version, seed):
    gen = torch.Generator().manual_seed(seed)
    g_idx = gptq.default_g_idx(k, group_size)
    if desc_act:  # act-order: groups are assigned over a permutation of the rows
        g_idx = g_idx[torch.argsort(torch.randperm(k, generator=gen))]
    n_groups = gptq.num_groups(k, group_size)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    if sym:
        zeros = torch.full((n_groups, n), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, 1 << bits, (n_groups, n), generator=gen, dtype=torch.int32)
        zeros[0, 0] = 0  # the v1 "-1" field: must read back as 0 (GPTQModel semantics)
    scales = (torch.rand(n_groups, n, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    return q, zeros, scales, g_idx


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip(bits, group_size, version, desc_act, sym):
    for i, (k, n) in enumerate(SHAPES):
        q, zeros, scales, g_idx = _random_layer(k, n, bits, group_size, desc_act, sym, version,
                                                seed=bits * 1000 + group_size + i)
        qweight, qzeros, s16, gi = gptq.pack(q, zeros, scales, g_idx, bits, version,
                                             group_size=group_size)
        assert qweight.shape == (-(-k * bits // 32), n)
        assert qzeros.shape == (gptq.num_groups(k, group_size), -(-n * bits // 32))
        uq, uz, us, ug = gptq.unpack(qweight, qzeros, s16, gi, bits, group_size, version)
        assert torch.equal(uq, q) and torch.equal(uz, zeros) and torch.equal(ug, g_idx.int())
        # re-packing the unpacked tensors gives the same words
        again = gptq.pack(uq, uz, us, ug, bits, version, group_size=group_size)
        assert torch.equal(again[0], qweight) and torch.equal(again[1], qzeros)
        w = gptq.dequantize(qweight, qzeros, s16, gi, bits, group_size, version)
        ref = (scales.float()[g_idx.long()] * (q - zeros[g_idx.long()]).float()).t()
        assert w.shape == (n, k) and w.dtype == torch.float16
        assert torch.equal(w, ref.half())


def _autogptq_pack_along_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """Packing written the way AutoGPTQ's QuantLinear.pack loops (uint32 words)."""
    rows = intweight.shape[0] // 32 * bits
    out = np.zeros((rows, intweight.shape[1]), dtype=np.uint32)
    iw = intweight.astype(np.uint32)
    i = row = 0
    while row < rows:
        if bits in (2, 4, 8):
            for j in range(32 // bits):
                out[row] |= iw[i + j] << np.uint32(bits * j)
            i += 32 // bits
            row += 1
        else:  # 3-bit: 10 values, 2 bits of the 11th, ... (32 values in 3 words)
            for j in range(10):
                out[row] |= iw[i + j] << np.uint32(3 * j)
            i += 10
            out[row] |= iw[i] << np.uint32(30)
            row += 1
            out[row] |= (iw[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(10):
                out[row] |= iw[i + j] << np.uint32(3 * j + 1)
            i += 10
            out[row] |= iw[i] << np.uint32(31)
            row += 1
            out[row] |= (iw[i] >> np.uint32(1)) & np.uint32(3)
            i += 1
            for j in range(10):
                out[row] |= iw[i + j] << np.uint32(3 * j + 2)
            i += 10
            row += 1
    return out.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_autogptq_loop_layout(bits):
    k, n = 128, 64
    q, zeros, scales, g_idx = _random_layer(k, n, bits, 32, False, False, 1, seed=bits)
    qweight, qzeros, _, _ = gptq.pack(q, zeros, scales, g_idx, bits, 1, group_size=32)
    assert np.array_equal(qweight.numpy(), _autogptq_pack_along_rows(q.numpy(), bits))
    if bits == 3:  # GPTQModel shifts 3-bit fields one by one (they straddle words)
        stored = ((zeros - 1) & 7).numpy()
        assert np.array_equal(qzeros.numpy(), _autogptq_pack_along_rows(stored.T, bits).T)
    else:  # GPTQModel: true zeros packed, then the ones pattern subtracted per int32 word
        words = _autogptq_pack_along_rows(zeros.numpy().T, bits).T.view(np.uint32)
        pattern = np.uint32(sum(1 << (bits * i) for i in range(32 // bits)))
        assert np.array_equal(qzeros.numpy().view(np.uint32), words - pattern)


def test_v1_symmetric_4bit_zeros_are_0x77777777():
    q, zeros, scales, g_idx = _random_layer(64, 32, 4, 32, False, True, 1, seed=0)
    _, qzeros, _, _ = gptq.pack(q, zeros, scales, g_idx, 4, 1)
    assert (qzeros == 0x77777777).all()
    _, qzeros2, _, _ = gptq.pack(q, zeros, scales, g_idx, 4, 2)
    assert (qzeros2 == -0x77777778).all()  # 0x88888888 as int32


def test_v1_zero_of_zero_borrows_like_gptqmodel():
    # GPTQModel writes v1 as (true-zero words) - 0x11111111: a zero of 0 borrows from the
    # field above it; reading adds the pattern back.  AutoGPTQ readers add 1 per field.
    q = torch.zeros(32, 8, dtype=torch.int32)
    zeros = torch.tensor([[0, 15, 0, 0, 7, 8, 0, 15]], dtype=torch.int32)
    qw, qz, s, gi = gptq.pack(q, zeros, torch.ones(1, 8), None, 4, 1, group_size=-1)
    true_words = sum(int(z) << (4 * i) for i, z in enumerate(zeros[0]))
    assert int(qz[0, 0]) & 0xFFFFFFFF == (true_words - 0x11111111) & 0xFFFFFFFF
    assert torch.equal(gptq.unpack(qw, qz, s, gi, 4, -1, 1)[1], zeros)
    auto = gptq.unpack(qw, qz, s, gi, 4, -1, 1, v1_zero="autogptq")[1]
    assert int(auto[0, 0]) == 16  # the stored field is 15 (0 - 1)
    # a zero of 16 (autogptq's reading of a stored 15) is written as a zero of 0
    sixteen = torch.where(zeros == 0, 16, zeros)
    assert torch.equal(gptq.pack(q, sixteen, s, gi, 4, 1)[1], qz)


def test_rtn_quantized_weight_dequantizes_close():
    w = torch.randn(48, 256)
    q, scales, zeros = rtn_quantize(w, 4, 64, sym=False)
    packed = gptq.pack(q, zeros, scales, None, 4, 2, group_size=64)
    back = gptq.dequantize(*packed, 4, 64, 2, dtype=torch.float32)
    assert (back - w).abs().max() <= scales.float().max() * 0.51 + 1e-3


def test_unpack_without_g_idx_uses_in_features():
    q, zeros, scales, g_idx = _random_layer(96, 16, 3, 32, False, False, 2, seed=3)
    qw, qz, s, _ = gptq.pack(q, zeros, scales, g_idx, 3, 2)
    assert torch.equal(gptq.unpack(qw, qz, s, None, 3, 32, 2)[0], q)  # 96*3/32 rows exact
    assert torch.equal(gptq.unpack(qw, qz, s, None, 3, 32, 2, in_features=96)[3], g_idx)


def test_malformed_shapes_raise_format_error():
    q, zeros, scales, g_idx = _random_layer(128, 64, 4, 32, False, False, 1, seed=1)
    qw, qz, s, gi = gptq.pack(q, zeros, scales, g_idx, 4, 1)
    with pytest.raises(FormatError, match="scales.*expected \\(4, 64\\)"):
        gptq.unpack(qw, qz, s[:3], gi, 4, 32, 1)
    with pytest.raises(FormatError, match="qweight.*expected \\(16, 64\\)"):
        gptq.unpack(qw[:15], qz, s, gi, 4, 32, 1)
    with pytest.raises(FormatError, match="qzeros.*expected \\(4, 8\\)"):
        gptq.unpack(qw, qz[:, :7], s, gi, 4, 32, 1)
    with pytest.raises(FormatError, match="scales"):
        gptq.unpack(qw, qz, s, gi, 4, 64, 1)  # wrong group size: 2 groups expected
    bad = gi.clone()
    bad[0] = 9
    with pytest.raises(FormatError, match="g_idx"):
        gptq.unpack(qw, qz, s, bad, 4, 32, 1)
    with pytest.raises(FormatError, match="bits=5"):
        gptq.unpack(qw, qz, s, gi, 5, 32, 1)
    with pytest.raises(FormatError, match="int32"):
        gptq.unpack(qw.float(), qz, s, gi, 4, 32, 1)
    with pytest.raises(FormatError, match="range"):
        gptq.pack(q + 16, zeros, scales, g_idx, 4, 2)


# ---------------------------------------------------------------- fixtures (golden)
@pytest.mark.parametrize("fixture_dir", fixture_dirs("gptq"), ids=lambda p: p.name)
def test_golden_fixtures(fixture_dir):
    fx = load_fixture(fixture_dir)
    qc = fx.quant_config
    version = 2 if "v2" in str(qc.get("checkpoint_format", "gptq")).lower() else 1
    refs = fx.dequant_refs()
    assert refs, f"{fx.name}: reference.safetensors holds no dequant.<module>"
    for mod, want in refs.items():
        t = fx.module_tensors(mod)
        # the reference is the library's fp16 dequant stored as float32, [out, in]
        w = gptq.dequantize(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                            qc["bits"], qc["group_size"], version).to(want.dtype)
        assert torch.equal(w, want), f"{fx.name}: {mod} differs"
