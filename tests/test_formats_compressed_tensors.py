"""formats.compressed_tensors: pack-/int-/float-quantized, compressed-tensors golden, fixtures."""

import pytest
import torch

from formats import compressed_tensors as ct
from formats import fp8
from quantrt.errors import FormatError
from tests.fixture_util import fixture_dirs, load_fixture


def _layer(n, k, bits, group_size, sym, actorder, seed):
    gen = torch.Generator().manual_seed(seed)
    g = k if group_size == -1 else group_size
    n_groups = -(-k // g)
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (n, k), generator=gen, dtype=torch.int32)
    scale = (torch.rand(n, n_groups, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    zp = None if sym else torch.randint(-half, half, (n, n_groups), generator=gen,
                                        dtype=torch.int32)
    g_idx = None
    if actorder:
        g_idx = (torch.arange(k) // g)[torch.randperm(k, generator=gen)].int()
    return q, scale, zp, g_idx, g


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_quantized_round_trip(bits, group_size, sym, actorder, dense):
    for n, k in ((23, 1376), (17, 96)):  # N odd; 1376 % 64 != 0 gives a partial group
        q, scale, zp, g_idx, g = _layer(n, k, bits, group_size, sym, actorder,
                                        seed=bits * 100 + n + group_size)
        t = ct.pack_packed(q, scale, bits, zp, g_idx, dense=dense)
        assert t["weight_packed"].shape == (n, -(-k * bits // 32) if dense or 32 % bits == 0
                                            else -(-k // (32 // bits)))
        assert t["weight_shape"].tolist() == [n, k]
        if zp is not None:
            assert t["weight_zero_point"].shape[1] == scale.shape[1]
        uq, us, uz, ug = ct.unpack_packed(t["weight_packed"], t["weight_scale"],
                                          t["weight_shape"], bits, t.get("weight_zero_point"),
                                          t.get("weight_g_idx"), dense=dense)
        assert torch.equal(uq, q) and torch.equal(us, scale)
        assert (uz is None and zp is None) or torch.equal(uz, zp)
        w = ct.dequantize_packed(t["weight_packed"], t["weight_scale"], t["weight_shape"], bits,
                                 t.get("weight_zero_point"), t.get("weight_g_idx"), dense=dense,
                                 group_size=g)
        cols = g_idx.long() if g_idx is not None else torch.arange(k) // g
        z = 0 if zp is None else zp[:, cols]
        ref = ((q - z).float() * scale.float()[:, cols]).to(torch.bfloat16)
        assert w.dtype == torch.bfloat16 and torch.equal(w, ref)


def test_int_quantized_dequant():
    q = torch.randint(-128, 128, (23, 96), dtype=torch.int8)
    scale = torch.rand(23, 1) * 0.01
    assert torch.equal(ct.dequantize_int(q, scale), q.float() * scale)
    zp = torch.randint(-5, 5, (23, 3), dtype=torch.int8)
    s3 = torch.rand(23, 3)
    ref = (q.float() - zp.float().repeat_interleave(32, 1)) * s3.repeat_interleave(32, 1)
    assert torch.equal(ct.dequantize_int(q, s3, zp), ref)


def test_float_quantized_strategies():
    w = torch.randn(200, 1376)
    for strategy in ("tensor", "channel", "block"):
        q, s = fp8.quantize(w, strategy)
        bs = (128, 128) if strategy == "block" else None
        out = ct.dequantize_float(q, s, block_structure=bs)
        assert torch.equal(out, fp8.dequantize(q, s, block_size=bs))
    q, _ = fp8.quantize(w, "tensor")
    gs = torch.rand(200, 43) + 0.5  # group strategy: [N, K/32]
    assert torch.equal(ct.dequantize_float(q, gs), q.float() * gs.repeat_interleave(32, 1))


def test_malformed_inputs():
    q, scale, zp, g_idx, _ = _layer(16, 64, 4, 32, False, True, seed=0)
    t = ct.pack_packed(q, scale, 4, zp, g_idx)
    args = (t["weight_packed"], t["weight_scale"], t["weight_shape"], 4)
    with pytest.raises(FormatError, match="weight_packed.*needs \\(16, 8\\)"):
        ct.unpack_packed(t["weight_packed"][:, :7], *args[1:])
    with pytest.raises(FormatError, match="weight_zero_point"):
        ct.unpack_packed(*args, t["weight_zero_point"][:1])
    with pytest.raises(FormatError, match="weight_scale"):
        ct.unpack_packed(t["weight_packed"], scale[:3], t["weight_shape"], 4)
    with pytest.raises(FormatError, match="weight_shape"):
        ct.unpack_packed(t["weight_packed"], scale, torch.tensor([16]), 4)
    bad = g_idx.clone()
    bad[3] = 2
    with pytest.raises(FormatError, match="weight_g_idx"):
        ct.unpack_packed(*args, t["weight_zero_point"], bad)
    with pytest.raises(FormatError, match="int8"):
        ct.dequantize_int(q, scale)
    with pytest.raises(FormatError, match="block"):
        fq, fs = fp8.quantize(torch.randn(200, 300), "block")
        ct.dequantize_float(fq, fs[:1], block_structure=(128, 128))


# ---------------------------------------------------------------- compressed-tensors golden
@pytest.fixture
def ct_lib():
    lib = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import (
        FloatQuantizationCompressor, IntQuantizationCompressor)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    return lib, PackedQuantizationCompressor, FloatQuantizationCompressor, \
        IntQuantizationCompressor, QuantizationArgs, QuantizationScheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_golden_pack_quantized(ct_lib, bits):
    _, Packed, _, _, Args, Scheme = ct_lib
    n, k = 23, 1376
    for strategy, gs in (("group", 32), ("channel", None)):
        for sym in (True, False):
            q, scale, zp, _, _ = _layer(n, k, bits, gs or -1, sym, False, seed=bits)
            scale = scale.float()  # (q - z) * s and its division by s stay exact in fp32
            scheme = Scheme(targets=["Linear"], weights=Args(
                num_bits=bits, type="int", symmetric=sym, strategy=strategy, group_size=gs))
            w = ct.dequantize_unpacked(q, scale, zp)  # exactly representable weights
            zp8 = (zp if zp is not None else torch.zeros_like(scale, dtype=torch.int32))
            sd = {"weight": w, "weight_scale": scale, "weight_zero_point": zp8.to(torch.int8)}
            comp = Packed.compress(sd, scheme)
            mine = ct.pack_packed(q, scale, bits, zp)
            assert torch.equal(comp["weight_packed"], mine["weight_packed"])
            assert torch.equal(comp["weight_shape"], mine["weight_shape"])
            if not sym:
                assert torch.equal(comp["weight_zero_point"], mine["weight_zero_point"])
            dec = Packed.decompress(dict(comp), scheme)["weight"]
            assert torch.equal(ct.dequantize_packed(comp["weight_packed"], comp["weight_scale"],
                                                    comp["weight_shape"], bits,
                                                    comp.get("weight_zero_point")), dec)


def test_golden_float_and_int_quantized(ct_lib):
    _, _, FloatC, IntC, Args, Scheme = ct_lib
    w = torch.randn(200, 1376)
    act = Args(num_bits=8, type="float", dynamic=True, strategy="token")
    for strategy in ("tensor", "channel", "block"):
        for sdt in (torch.float32, torch.bfloat16):
            q, s = fp8.quantize(w, strategy)
            s = s.to(sdt)
            bs = [128, 128] if strategy == "block" else None
            scheme = Scheme(targets=["Linear"], input_activations=act, weights=Args(
                num_bits=8, type="float", symmetric=True, strategy=strategy, block_structure=bs))
            comp = FloatC.compress({"weight": w, "weight_scale": s}, scheme)
            dec = FloatC.decompress(dict(comp), scheme)["weight"]
            assert torch.equal(ct.dequantize_float(comp["weight"], comp["weight_scale"],
                                                   block_structure=bs), dec)
            if sdt == torch.float32:  # same rounding when dividing in float32
                assert torch.equal(comp["weight"].view(torch.uint8), q.view(torch.uint8))
    iact = Args(num_bits=8, type="int", dynamic=True, strategy="token")
    scheme = Scheme(targets=["Linear"], input_activations=iact,
                    weights=Args(num_bits=8, type="int", symmetric=True, strategy="channel"))
    comp = IntC.compress({"weight": w, "weight_scale": w.abs().amax(1, keepdim=True) / 127},
                         scheme)
    assert torch.equal(ct.dequantize_int(comp["weight"], comp["weight_scale"]),
                       IntC.decompress(dict(comp), scheme)["weight"])


# ---------------------------------------------------------------- fixtures
@pytest.mark.parametrize("fixture_dir", fixture_dirs("ct_"), ids=lambda p: p.name)
def test_golden_fixtures(fixture_dir):
    fx = load_fixture(fixture_dir)
    groups = list(fx.quant_config["config_groups"].values())
    assert len(groups) == 1, f"{fx.name}: {len(groups)} config groups"
    wargs = groups[0]["weights"]
    fmt = groups[0].get("format") or fx.quant_config.get("format")
    refs = fx.dequant_refs()
    assert refs, f"{fx.name}: reference.safetensors holds no dequant.<module>"
    for mod, want in refs.items():
        t = fx.module_tensors(mod)
        if fmt == "pack-quantized":
            w = ct.dequantize_packed(t["weight_packed"], t["weight_scale"], t["weight_shape"],
                                     wargs["num_bits"], t.get("weight_zero_point"),
                                     t.get("weight_g_idx"))
        elif fmt == "float-quantized":
            w = ct.dequantize_float(t["weight"], t["weight_scale"],
                                    block_structure=wargs.get("block_structure"))
        else:
            assert fmt in ("int-quantized", "naive-quantized"), f"{fx.name}: format {fmt!r}"
            w = ct.dequantize_int(t["weight"], t["weight_scale"], t.get("weight_zero_point"),
                                  t.get("weight_g_idx"))
        assert torch.equal(w.to(want.dtype), want), f"{fx.name}: {mod} differs"
