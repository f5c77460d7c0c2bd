"""formats.hqq: plane packings, quantize/dequantize, HQQLinear state dicts, hqq golden."""
import pytest
import torch

from formats import hqq
from quantrt.errors import FormatError

PACKING_ROWS = {"8bit_u8": [1, 23, 96], "4bit_u8": [2, 24, 96], "2bit_u8": [4, 24, 96],
                "1bit_u8": [8, 24, 96], "3bit_32": [1, 17, 23, 96, 1376]}


@pytest.mark.parametrize("packing", sorted(hqq.PACKINGS))
def test_pack_round_trip(packing):
    bits, per, container = hqq.PACKINGS[packing]
    gen = torch.Generator().manual_seed(bits)
    for rows in PACKING_ROWS[packing]:
        v = torch.randint(0, 1 << bits, (rows, 5), generator=gen, dtype=torch.int32)
        packed = hqq.pack(v, packing)
        assert packed.dtype == container and packed.shape == (-(-rows // per), 5)
        assert torch.equal(hqq.unpack(packed, packing, rows=rows), v)
        assert torch.equal(hqq.pack(hqq.unpack(packed, packing, rows=rows), packing), packed)
        if container == torch.uint8:  # view_as_float checkpoints store these bytes as floats
            as_float = packed.reshape(packed.shape[0], -1, 5).view(torch.uint8)
            assert torch.equal(hqq.unpack(as_float.reshape(packed.shape), packing), v)


def test_first_slab_in_high_bits():
    v = torch.tensor([[1], [2]], dtype=torch.int32)  # 4bit: row 0 -> high nibble
    assert hqq.pack(v, "4bit_u8").tolist() == [[0x12]]
    v3 = torch.arange(10, dtype=torch.int32)[:, None] % 8  # 3bit: row 0 at bit 27
    word = sum(int(x) << (27 - 3 * i) for i, x in enumerate(v3.reshape(-1)))
    assert hqq.pack(v3, "3bit_32").tolist() == [[word]]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 8])
def test_quantize_dequantize_shapes(nbits, axis):
    w = torch.randn(24, 96)
    for group_size in (32, 64, None):
        r, c = hqq.view_shape(w.shape, group_size, axis)
        if nbits == 1 and r % 8:
            with pytest.raises(FormatError, match="multiple of 8"):
                hqq.quantize(w, nbits, group_size, axis)
            continue
        packed, scale, zero = hqq.quantize(w, nbits, group_size, axis)
        assert scale.shape == ((r, 1) if axis == 1 else (1, c))
        back = hqq.dequantize(packed, scale, zero, w.shape, group_size, axis,
                              hqq.BIT_TO_PACKING[nbits])
        step = scale.abs().max()
        assert back.shape == w.shape and (back - w).abs().max() <= step * 0.51 + 1e-5


def test_float_zero_rounds_in_compute_dtype():
    codes = torch.tensor([[3], [5]], dtype=torch.int32)
    zero = torch.tensor([[1.3]], dtype=torch.float16)
    scale = torch.tensor([[0.1]], dtype=torch.float16)
    w = hqq.dequantize(codes, scale, zero, (2, 1), None, 0)
    assert w.dtype == torch.float16
    assert torch.equal(w, (codes.half() - zero) * scale)


def test_malformed_inputs():
    with pytest.raises(FormatError, match="multiple of 8"):
        hqq.pack(torch.zeros(36, 4, dtype=torch.int32), "1bit_u8")
    with pytest.raises(FormatError, match="must lie in"):
        hqq.pack(torch.full((2, 2), 16), "4bit_u8")
    with pytest.raises(FormatError, match="unknown packing"):
        hqq.pack(torch.zeros(2, 2, dtype=torch.int32), "5bit_u8")
    with pytest.raises(FormatError, match="does not divide"):
        hqq.view_shape((23, 17), 64, 1)
    packed, scale, zero = hqq.quantize(torch.randn(8, 64), 4, 32, 1)
    with pytest.raises(FormatError, match="scale"):
        hqq.dequantize(packed, scale[:3], zero, (8, 64), 32, 1, "4bit_u8")
    with pytest.raises(FormatError, match="W_q"):
        hqq.dequantize(packed[:3], scale, zero, (8, 64), 32, 1, "4bit_u8")
    with pytest.raises(FormatError, match="missing 'zero'"):
        hqq.parse_layer({"W_q": packed, "scale": scale, "shape": torch.tensor([8, 64]),
                         "nbits": torch.tensor(4), "axis": torch.tensor(1)})


# ---------------------------------------------------------------- hqq golden
@pytest.fixture
def hqq_core():
    return pytest.importorskip("hqq.core.quantize")


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 8])
def test_golden_bitpack(hqq_core, nbits):
    packing = hqq_core.Quantizer.bit_to_packing[nbits]
    assert hqq.BIT_TO_PACKING[nbits] == packing
    rows = 23 if nbits in (3, 8) else 24
    v = torch.randint(0, 1 << nbits, (rows, 7), dtype=torch.uint8)
    ref = hqq_core.Quantizer.pack[packing](v)
    assert torch.equal(hqq.pack(v, packing), ref)
    unpacked = hqq_core.Quantizer.unpack[packing](ref, dtype=torch.uint8)
    assert torch.equal(hqq.unpack(ref, packing).to(torch.uint8), unpacked)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 8])
def test_golden_quantizer(hqq_core, nbits, axis):
    Q = hqq_core.Quantizer
    w = torch.randn(24, 96)
    for group_size in (32, 64, None):
        if nbits == 1 and axis == 1 and group_size == 64:
            continue  # 36 rows: hqq mis-packs silently, ours refuses (test_malformed_inputs)
        ref_q, meta = Q.quantize(w, nbits=nbits, group_size=group_size, optimize=False,
                                 axis=axis, device="cpu")
        q, scale, zero = hqq.quantize(w, nbits, group_size, axis)
        assert torch.equal(q, ref_q) and torch.equal(scale, meta["scale"])
        assert torch.equal(zero, meta["zero"])
        if nbits == 3 and group_size is None:
            continue  # hqq's 3-bit dequantize slices by group_size and fails on None
        for cd in (torch.float16, torch.bfloat16):
            m = dict(meta, scale=meta["scale"].to(cd), zero=meta["zero"].to(cd), compute_dtype=cd)
            assert torch.equal(hqq.dequantize(q, m["scale"], m["zero"], w.shape, group_size,
                                              axis, meta["packing"]), Q.dequantize(ref_q, m))


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 8])
def test_golden_hqq_linear_state_dict(hqq_core, nbits):
    torch.manual_seed(nbits)
    for axis in (0, 1):
        lin = torch.nn.Linear(96, 24)
        cfg = hqq_core.BaseQuantizeConfig(nbits=nbits, group_size=32, axis=axis)
        layer = hqq_core.HQQLinear(lin, cfg, compute_dtype=torch.float16, device="cpu")
        state = layer.state_dict()  # encoded for safetensors: packing as bytes, etc.
        meta = hqq.parse_layer(state)
        assert meta["shape"] == (24, 96) and meta["nbits"] == nbits and meta["axis"] == axis
        assert torch.equal(hqq.dequantize_layer(state), layer.dequantize())
