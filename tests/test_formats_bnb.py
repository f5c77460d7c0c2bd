"""formats.bnb: nibble layout, quant_state JSON, 4-bit/8-bit dequant, bitsandbytes golden."""
import json

import pytest
import torch

from formats import bnb
from quantrt.errors import FormatError
from tests.fixture_util import fixture_dirs, load_fixture

SHAPES = [(64, 128), (23, 17), (7, 96), (1376, 24)]


def test_nibble_round_trip_and_order():
    idx = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    packed = bnb.pack_4bit(idx, pad_index=7)
    assert packed.shape == (3, 1) and packed.reshape(-1).tolist() == [0x12, 0x34, 0x57]
    assert torch.equal(bnb.unpack_4bit(packed, 5), idx)
    as_bf16 = bnb.pack_4bit(torch.arange(8) % 16, storage=torch.bfloat16)  # quant_storage
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(bnb.unpack_4bit(as_bf16, 8), (torch.arange(8) % 16).to(torch.uint8))
    with pytest.raises(FormatError, match="bytes"):
        bnb.unpack_4bit(packed, 9)


def test_quant_state_json_round_trip():
    meta = {"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [23, 17],
            "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5}
    blob = bnb.build_quant_state(meta)
    assert blob.dtype == torch.uint8 and bytes(blob.tolist()).decode() == json.dumps(meta)
    assert bnb.parse_quant_state(blob) == meta
    with pytest.raises(FormatError, match="JSON"):
        bnb.parse_quant_state(torch.tensor([0xFF, 0xFE], dtype=torch.uint8))
    with pytest.raises(FormatError, match="blocksize"):
        bnb.parse_quant_state(bnb.build_quant_state({"quant_type": "nf4", "dtype": "float16",
                                                      "shape": [2, 2]}))
    with pytest.raises(FormatError, match="quant_type"):
        bnb.parse_quant_state(bnb.build_quant_state({"quant_type": "int4", "blocksize": 64,
                                                      "dtype": "float16", "shape": [2, 2]}))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_dequantize_round_trip(quant_type, double_quant):
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for blocksize in (64, 128):
            w = torch.randn(*shape, generator=gen).to(torch.float16)
            sd = bnb.quantize_4bit(w, quant_type, blocksize, double_quant)
            n = w.numel()
            assert sd["weight"].shape == (-(-n // 2), 1)
            assert sd["weight.absmax"].dtype == (torch.uint8 if double_quant else torch.float32)
            back = bnb.dequantize_4bit_state_dict(sd)
            assert back.shape == w.shape and back.dtype == torch.float16
            # every value is one of the 16 codes times its block's absmax
            idx = bnb.unpack_4bit(sd["weight"], n).long()
            meta = bnb.parse_quant_state(sd[f"weight.{bnb.quant_state_key(quant_type)}"])
            am = bnb.dequantize_absmax(sd["weight.absmax"], sd.get("weight.nested_absmax"),
                                       sd.get("weight.nested_quant_map"),
                                       meta.get("nested_offset"))
            ref = (bnb.get_code(quant_type)[idx] * am[torch.arange(n) // blocksize]).half()
            assert torch.equal(back.reshape(-1), ref)
            err = (back.float() - w.float()).abs().reshape(-1)
            assert (err <= am[torch.arange(n) // blocksize] * 0.2 + 1e-2).all()


def test_odd_count_pads_with_code_of_zero():
    w = torch.randn(3, 3)
    assert bnb.unpack_4bit(bnb.quantize_4bit(w, "nf4")["weight"], 10)[-1] == 7
    assert bnb.unpack_4bit(bnb.quantize_4bit(w, "fp4")["weight"], 10)[-1] == 0


def test_int8_round_trip_and_malformed():
    w = torch.randn(23, 96)
    cb, scb = bnb.quantize_int8(w)
    assert cb.dtype == torch.int8 and scb.shape == (23,)
    back = bnb.dequantize_int8(cb, scb)
    assert (back - w).abs().max() <= scb.max() / 127 * 0.51
    with pytest.raises(FormatError, match="SCB"):
        bnb.dequantize_int8(cb, scb[:5])
    with pytest.raises(FormatError, match="int8"):
        bnb.dequantize_int8(cb.float(), scb)


def test_malformed_4bit_state():
    sd = bnb.quantize_4bit(torch.randn(16, 16), "nf4", 64, double_quant=True)
    with pytest.raises(FormatError, match="absmax"):
        bnb.dequantize_4bit(sd["weight"], sd["weight.absmax"],
                            sd["weight.quant_state.bitsandbytes__nf4"])  # nested parts missing
    bad = dict(sd)
    bad["weight.nested_absmax"] = torch.ones(3)
    with pytest.raises(FormatError, match="nested_absmax"):
        bnb.dequantize_4bit_state_dict(bad)
    with pytest.raises(FormatError, match="quant_state"):
        bnb.dequantize_4bit_state_dict({"weight": sd["weight"]})


# ---------------------------------------------------------------- bitsandbytes golden
@pytest.fixture
def bnb_functional():
    F = pytest.importorskip("bitsandbytes.functional")
    # bitsandbytes torch.compile()s its odd-shape fallback; compiling costs seconds and
    # changes nothing numerically, so keep dynamo off while these tests run.
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield F
    torch._dynamo.config.disable = old


def test_golden_code_tables(bnb_functional):
    F = bnb_functional
    assert torch.equal(bnb.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(bnb.FP4_CODE, F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(bnb.dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_golden_quantize_and_dequantize_4bit(bnb_functional, quant_type):
    F = bnb_functional
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        for dtype, blocksize in ((torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 64)):
            for dq in (False, True):
                w = torch.randn(*shape, generator=gen).to(dtype)
                q, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq,
                                           quant_type=quant_type)
                sd = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
                sd["weight"] = q
                # reading: bit-exact with bitsandbytes' dequantize_4bit (value equality:
                # its native FP4 kernel returns +0.0 where the code table has -0.0)
                assert torch.equal(bnb.dequantize_4bit_state_dict(sd), F.dequantize_4bit(q, state))
                mine = bnb.quantize_4bit(w, quant_type, blocksize, dq)
                assert torch.equal(mine["weight"], q)
                key = f"weight.quant_state.bitsandbytes__{quant_type}"
                if not dq:
                    assert torch.equal(mine["weight.absmax"], state.absmax)
                    assert torch.equal(mine[key], sd[key])
                else:  # nested codes may differ by one step from bnb's native CPU search
                    ours = bnb.dequantize_4bit_state_dict(mine).float()
                    theirs = F.dequantize_4bit(q, state).float()
                    assert torch.allclose(ours, theirs, rtol=0.05, atol=1e-3)


def test_golden_int8(bnb_functional):
    F = bnb_functional
    w = torch.randn(23, 96, dtype=torch.float16)
    cb, scb, _ = F.int8_vectorwise_quant(w.clone())
    mcb, mscb = bnb.quantize_int8(w)
    assert torch.equal(cb, mcb) and torch.equal(scb, mscb)
    assert torch.equal(bnb.dequantize_int8(cb, scb), F.int8_vectorwise_dequant(cb, scb))


# ---------------------------------------------------------------- fixtures
@pytest.mark.parametrize("fixture_dir", fixture_dirs("bnb"), ids=lambda p: p.name)
def test_golden_fixtures(fixture_dir):
    fx = load_fixture(fixture_dir)
    refs = fx.dequant_refs()
    assert refs, f"{fx.name}: reference.safetensors holds no dequant.<module>"
    for mod, want in refs.items():
        if f"{mod}.SCB" in fx.tensors:
            w = bnb.dequantize_int8(fx.tensors[f"{mod}.weight"], fx.tensors[f"{mod}.SCB"], want.dtype)
        else:
            sub = {k: v for k, v in fx.module_tensors(mod).items() if k.startswith("weight")}
            w = bnb.dequantize_4bit_state_dict(sub).to(want.dtype)  # bnb dequantizes to fp16
        assert torch.equal(w, want), f"{fx.name}: {mod} differs"
