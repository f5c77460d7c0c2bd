"""HQQ: settings (transformers' quant_config and qmodel.pt detection), both on-disk layouts,
every packing through the loader's layer path against hqq itself, and bad checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from quantrt.errors import ConfigError, UnsupportedError
from quantrt.quant.hqq import HQQConfig, HQQParams
from tests.fixture_util import FIXTURES, cli_error, copy_fixture, load_fixture, prompt_logits

NAMES = ("hqq_3bit_g64", "hqq_4bit_g64_axis1")
LAYER = "model.layers.1.mlp.down_proj"


def _wqp(**kw):
    return {"weight_quant_params": {"nbits": 4, "channel_wise": True, "group_size": 64,
                                    "optimize": True, "round_zero": True, "axis": 1,
                                    "view_as_float": False, **kw},
            "scale_quant_params": None, "zero_quant_params": None, "offload_meta": False}


# ---------------------------------------------------------------- settings
def test_transformers_config_and_skip_modules():
    qc = HQQConfig.from_config({"quant_method": "hqq", "quant_config": _wqp(nbits=3, axis=0),
                                "skip_modules": ["lm_head", "mlp.down_proj"]})
    assert qc.params_for("model.layers.0.self_attn.q_proj") == HQQParams(3, 64, 0)
    assert qc.params_for("model.layers.5.mlp.down_proj") is None
    assert qc.params_for("lm_head") is None
    assert qc.settings()["nbits"] == 3 and qc.settings()["skip_modules"] == ["lm_head",
                                                                           "mlp.down_proj"]


def test_dynamic_config_by_linear_tag():
    """transformers' dynamic_config: tags it does not name stay unquantized."""
    qc = HQQConfig.from_config({"quant_method": "hqq", "skip_modules": [],
                                "quant_config": {"self_attn.q_proj": _wqp(nbits=8),
                                                 "mlp.down_proj": _wqp(nbits=2, group_size=None)}})
    assert qc.params_for("model.layers.2.self_attn.q_proj").nbits == 8
    assert qc.params_for("model.layers.2.mlp.down_proj") == HQQParams(2, None, 1)
    assert qc.params_for("model.layers.2.mlp.up_proj") is None
    assert qc.settings()["dynamic"]["self_attn.q_proj"]["nbits"] == 8


def test_flat_settings_and_ternary():
    assert HQQConfig.from_config({"nbits": 1.58, "group_size": 32}).default == HQQParams(1.58, 32, 1)
    assert HQQParams(1.58, 32, 1).int_bits == 2 and HQQParams(1.58, 32, 1).packing == "2bit_u8"


@pytest.mark.parametrize("wqp,needle", [
    ({"nbits": 7}, "quant_config.weight_quant_params.nbits"),
    ({"nbits": "4"}, "nbits"),
    ({"axis": 2}, "quant_config.weight_quant_params.axis"),
    ({"group_size": 0}, "quant_config.weight_quant_params.group_size"),
    ({"view_as_float": "no"}, "view_as_float"),
])
def test_bad_values_name_the_key(wqp, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        HQQConfig.from_config({"quant_config": _wqp(**wqp)})


def test_bad_config_shapes():
    with pytest.raises(ConfigError, match="quant_config"):
        HQQConfig.from_config({"quant_method": "hqq"})
    with pytest.raises(ConfigError, match="skip_modules"):
        HQQConfig.from_config({"quant_config": _wqp(), "skip_modules": "lm_head"})
    with pytest.raises(ConfigError, match=r"quant_config\.mlp\.down_proj"):
        HQQConfig.from_config({"quant_config": {"mlp.down_proj": [4]}})
    bad = _wqp()
    bad["zero_quant_params"] = {"nbits": 8}
    with pytest.raises(UnsupportedError, match="zero_quant_params"):
        HQQConfig.from_config({"quant_config": bad})


# ---------------------------------------------------------------- the qmodel.pt format
def test_detection_reads_per_layer_metadata():
    from formats.safetensors_file import open_checkpoint
    from quantrt.quant.detect import detect_hf, read_json

    d = FIXTURES / "hqq_3bit_g64"
    det = detect_hf(str(d), read_json(str(d / "config.json")))
    assert det.method == "hqq" and det.where.endswith("qmodel.pt")
    assert det.settings["quant_config"]["weight_quant_params"] == {
        "nbits": 3, "group_size": 64, "axis": 1, "view_as_float": False}
    assert det.settings["skip_modules"] == ["embed_tokens", "lm_head"]
    ckpt = open_checkpoint(d)  # qmodel.pt wins over the fixture's reference.safetensors
    assert f"{LAYER}.W_q" in ckpt and ckpt.get(f"{LAYER}.nbits").item() == 3
    assert "lm_head.weight" in ckpt


@pytest.mark.parametrize("name", NAMES)
def test_inspect_json_reports_settings(name):
    from quantrt.cli import main

    res = CliRunner().invoke(main, ["inspect", str(FIXTURES / name), "--json",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    q = report["quantization"]
    assert q["method"] == "hqq" and q["checkpoint"] == "qmodel.pt"
    assert (q["nbits"], q["group_size"], q["axis"]) == ((3 if "3bit" in name else 4), 64, 1)
    down = report["layers"]["mlp.down_proj"]
    # K=336 is no multiple of 64: groups run on into the next row, split every 16 columns.
    assert "hqq" in down["weight_format"] and "group size 16" in down["kernel"]
    assert report["layers"]["self_attn.qkv_proj"]["kernel"].startswith("cpu-int4pack")


def _hf_layout(tmp_path, name):
    """The fixture re-saved the way transformers serialises HQQ: hqq's own encoded
    HQQLinear.state_dict() per layer in model.safetensors, quantization_config in
    config.json (quant_config + skip_modules)."""
    hqq_quant = pytest.importorskip("hqq.core.quantize")
    from safetensors.torch import save_file

    src = FIXTURES / name
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("qmodel.pt", "reference.safetensors"))
    qmodel = torch.load(src / "qmodel.pt", weights_only=True)
    tensors = {}
    for module, state in qmodel.items():
        if "W_q" in state:
            lin = hqq_quant.HQQLinear(None, quant_config=None, compute_dtype=torch.float16,
                                      device="cpu", initialize=False)
            lin.load_state_dict(dict(state))
            state = lin.state_dict()
        tensors.update({f"{module}.{k}": v.data.contiguous() for k, v in state.items()})
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "hqq", "skip_modules": ["lm_head"],
                                  "quant_config": _wqp(nbits=3 if "3bit" in name else 4)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_transformers_safetensors_layout_equals_qmodel(tmp_path):
    from quantrt.loader import load

    name = "hqq_3bit_g64"
    fx = load_fixture(FIXTURES / name)
    ids = fx.reference["input_ids"][0].tolist()
    a = load(FIXTURES / name, kernels="reference", device="cpu", progress=False)
    b = load(_hf_layout(tmp_path, name), kernels="reference", device="cpu", progress=False)
    assert b.detected.method == "hqq" and b.detected.where.endswith("config.json")
    assert torch.equal(prompt_logits(a, ids), prompt_logits(b, ids))


# ---------------------------------------------------------------- every packing vs hqq
CASES = [(1, 64, 1, False), (2, 32, 1, False), (3, 64, 1, True), (4, 64, 0, False),
         (4, None, 1, False), (5, 64, 1, False), (8, 128, 0, True), (4, 48, 1, False)]


@pytest.mark.parametrize("nbits,group_size,axis,view_as_float", CASES)
def test_layer_matches_hqq_dequantize(nbits, group_size, axis, view_as_float):
    """hqq quantizes a [96, 192] weight; its encoded state dict loads into a QuantLinear and
    the reference, the integer form and the chosen kernel agree with HQQLinear.dequantize()
    (hqq rounds the zero subtraction in fp16; we do not: differences stay below 1 fp16 ulp
    of the weight range)."""
    hqq_quant = pytest.importorskip("hqq.core.quantize")
    from quantrt.models.layers import QuantLinear

    torch.manual_seed(nbits * 10 + axis)
    lin = torch.nn.Linear(192, 96, bias=False)
    cfg = hqq_quant.BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis,
                                       view_as_float=view_as_float)
    ref = hqq_quant.HQQLinear(lin, cfg, compute_dtype=torch.float16, device="cpu")
    state = ref.state_dict()
    want = ref.dequantize().float()
    qc = HQQConfig.from_config({"quant_config": cfg, "skip_modules": []})
    layer = QuantLinear(192, [96], bias=False, quant_config=qc, prefix="model.layers.0.mlp.up_proj",
                        params_dtype=torch.float32)
    for key, t in state.items():
        if t is not None and key != "bias":
            layer.load(key, t)
    raw = dict(layer.raw_shards[0])
    got = layer.method.reference(raw, 96, 192, "x")
    tol = 2e-3 * want.abs().max().item()
    assert (got - want).abs().max().item() < tol
    canon = layer.method.to_int(raw, 96, 192, "x")
    assert (canon is None) == (axis == 0)
    if canon is not None:
        assert torch.equal(canon.dequantize(), got)
    layer.process_weights_after_loading(torch.device("cpu"))
    x = torch.randn(5, 192)
    out = layer(x)
    assert (out - x @ got.t()).abs().max().item() < 0.03 * (x @ got.t()).abs().max().item()


# ---------------------------------------------------------------- bad checkpoints
class Payload:
    """Pickled as a global reference: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def _copy(tmp_path, name="hqq_4bit_g64_axis1"):
    return copy_fixture(tmp_path, name)


def _edit_qmodel(d, fn):
    qmodel = torch.load(d / "qmodel.pt", weights_only=True)
    fn(qmodel)
    torch.save(qmodel, d / "qmodel.pt")


def _error(d) -> str:
    out = cli_error(d)
    assert "must never run" not in out  # the pickled payload of the code-injection case
    return out


BAD = {
    "pickled code": (lambda q: q[LAYER].update(extra=Payload()),
                     ["qmodel.pt", "pickled code/objects", "refuses"]),
    "non-tensor object": (lambda q: q[LAYER].update(extra=[1, 2]),
                          [f"{LAYER}.extra", "list", "tensor or HQQ metadata"]),
    "missing scale": (lambda q: q[LAYER].pop("scale"), [f"{LAYER}", "'scale'"]),
    "layers disagree": (lambda q: q[LAYER].update(nbits=8, packing="8bit_u8"),
                        ["mlp.down_proj", "different settings"]),
    "shape disagrees": (lambda q: q[LAYER].update(shape=torch.Size([336, 128])),
                        [f"{LAYER}", "shape"]),
    "quantized meta": (lambda q: q[LAYER].update(quant_zero=True), [LAYER, "quant_zero"]),
    "W_q truncated": (lambda q: q[LAYER].update(W_q=q[LAYER]["W_q"][:-1]),
                      [f"{LAYER}.W_q", "shape"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_qmodel_gets_clear_error(tmp_path, case):
    fn, needles = BAD[case]
    d = _copy(tmp_path)
    _edit_qmodel(d, fn)
    out = _error(d)
    for needle in needles:
        assert needle in out, out


def test_metadata_must_match_settings(tmp_path):
    """transformers layout whose config says 4 bits over a layer that records 3."""
    d = _hf_layout(tmp_path, "hqq_3bit_g64")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_config"]["weight_quant_params"]["nbits"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    out = _error(d)
    assert "W_q" in out and "shape" in out  # 4-bit W_q is laid out differently


def test_metadata_disagreement_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _hf_layout(tmp_path, "hqq_3bit_g64")
    tensors = load_file(d / "model.safetensors")
    tensors[f"{LAYER}.axis"] = torch.tensor(0, dtype=torch.int32)
    save_file(tensors, d / "model.safetensors")
    out = _error(d)
    assert f"{LAYER}.axis" in out and "= 0" in out


def test_not_hqq_qmodel_is_left_alone(tmp_path):
    """A qmodel.pt without HQQ layers is not taken for HQQ."""
    from quantrt.quant.detect import detect_hf

    d = _copy(tmp_path)
    torch.save({"model.norm": {"weight": torch.ones(4)}}, d / "qmodel.pt")
    assert detect_hf(str(d), {}).method == "none"
