"""Marlin's pre-tiled layout: our unpack inverts AutoGPTQ's packer (fixtures made by
AutoGPTQ 0.7.1's Marlin QuantLinear.pack), pack/unpack round-trip bit-exactly, and shapes or
settings the layout cannot hold are refused with a clear error."""
import pytest
import torch
from safetensors.torch import load_file

from formats import marlin
from quantrt.errors import ConfigError, FormatError
from quantrt.quant.detect import detect_hf
from quantrt.quant.marlin import MarlinConfig
from tests.fixture_util import FIXTURES


@pytest.mark.parametrize("k,n,group", [(128, 64, -1), (256, 192, 128), (384, 64, 64),
                                       (16, 64, -1), (512, 320, 32)])
def test_pack_unpack_roundtrip(k, n, group):
    g = torch.Generator().manual_seed(k * n)
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    groups = 1 if group == -1 else k // group
    scales = torch.rand(groups, n, generator=g).half()
    B, s = marlin.pack(q, scales, group)
    assert B.dtype == torch.int32 and B.shape == (k // 16, n * 2)
    q2, s2 = marlin.unpack(B, s, k, n, group)
    assert torch.equal(q2, q) and torch.equal(s2, scales)


@pytest.mark.parametrize("name,group", [("marlin_g128", 128), ("marlin_gcol", -1)])
def test_fixture_repacks_to_the_same_bytes(name, group):
    sd = load_file(FIXTURES / name / "model.safetensors")
    for key in [k for k in sd if k.endswith(".B")]:
        s = sd[key[:-2] + ".s"]
        k, n = sd[key].shape[0] * 16, s.shape[1]
        q, scales = marlin.unpack(sd[key], s, k, n, group)
        assert int(q.min()) >= 0 and int(q.max()) <= 15
        B, s2 = marlin.pack(q, scales, group)
        assert torch.equal(B, sd[key]) and torch.equal(s2, s)


def test_fixture_dequant_matches_the_packed_weight():
    d = FIXTURES / "marlin_g128"
    sd, ref = load_file(d / "model.safetensors"), load_file(d / "reference.safetensors")
    p = "model.layers.1.mlp.down_proj"
    w = marlin.dequantize(sd[p + ".B"], sd[p + ".s"], 512, 256, 128)
    assert torch.equal(w.half(), ref["dequant." + p].half())


@pytest.mark.parametrize("k,n,group", [(120, 64, -1), (128, 96, -1), (256, 64, 96)])
def test_unrepresentable_shapes_are_refused(k, n, group):
    with pytest.raises(FormatError, match="Marlin"):
        marlin.check_shape(k, n, group)


def test_detected_from_gptq_checkpoint_format():
    cfg = {"quantization_config": {"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}}
    assert detect_hf("/nowhere", cfg).method == "marlin"
    cfg = {"quantization_config": {"quant_method": "gptq", "bits": 4, "is_marlin_format": True}}
    assert detect_hf("/nowhere", cfg).method == "marlin"


@pytest.mark.parametrize("cfg,needle", [({"bits": 8}, "4-bit"), ({"sym": False}, "symmetric"),
                                        ({"desc_act": True}, "desc_act"),
                                        ({"group_size": 0}, "group_size"),
                                        ({"lm_head": "yes"}, "lm_head")])
def test_bad_settings(cfg, needle):
    with pytest.raises(ConfigError, match=needle):
        MarlinConfig.from_config({"quant_method": "marlin", **cfg})
