"""bitsandbytes: settings (aliases, bad values), skip lists, online NF4, the kernels against the
reference, the int8 weight-only forward, bad checkpoints and ``inspect --json``."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from formats import bnb as bnb_format
from quantrt.errors import ConfigError, UnsupportedError
from quantrt.quant.base import canonical_method, config_class
from quantrt.quant.bnb import BitsAndBytesConfig, matches_any
from quantrt.quant.detect import DetectedQuant, resolve
from quantrt.quant.unquantized import UnquantizedLinearMethod
from tests.fixture_util import FIXTURES, load_fixture, prompt_logits
from tests.fixture_util import assert_bad_checkpoint
from tests.fixture_util import cli_error as _error
from tests.fixture_util import copy_fixture as _copy
from tests.fixture_util import edit_config as _edit_config
from tests.fixture_util import edit_tensors as _edit_tensors
from tests.tiny_models import make_tiny_model

LAYER = "model.layers.1.mlp.down_proj"
NF4 = json.loads((FIXTURES / "bnb_nf4_dq" / "config.json").read_text())["quantization_config"]
INT8 = json.loads((FIXTURES / "bnb_int8" / "config.json").read_text())["quantization_config"]


def _load(d, quantization=None, kernels="reference"):
    from quantrt.loader import load

    return load(d, quantization, kernels=kernels, device="cpu", progress=False)


def replace_linears(src, dst, fn):
    """A copy of checkpoint ``src`` whose decoder linear weights are ``fn(name, W)``."""
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(path)
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("_proj.weight"):
            tensors[name] = fn(name, t)
    save_file(tensors, path)
    return dst


def _logits(lm, ids=(256, 72, 101, 108, 108, 111, 44, 32, 119)):
    return prompt_logits(lm, list(ids))


# -- settings ---------------------------------------------------------------------------------
def test_names_and_aliases():
    for name in ("bitsandbytes", "BNB", "bitsandbytes_4bit", "bitsandbytes-8bit"):
        assert canonical_method(name) == "bitsandbytes"
        assert config_class(name) is BitsAndBytesConfig


def test_fixture_settings():
    nf4 = BitsAndBytesConfig.from_config(NF4).settings()
    assert nf4 == {"bits": 4, "quant_type": "nf4", "double_quant": True,
                   "compute_dtype": "float16", "quant_storage": "uint8",
                   "skip_modules": ["lm_head"], "online": False}
    int8 = BitsAndBytesConfig.from_config(INT8).settings()
    assert int8["bits"] == 8 and int8["llm_int8_threshold"] == 6.0
    # transformers' defaults: fp4, no double quant, a compute dtype spelled as torch's.
    bare = BitsAndBytesConfig.from_config({"load_in_4bit": True,
                                           "bnb_4bit_compute_dtype": "torch.bfloat16"})
    assert bare.params.quant_type == "fp4" and not bare.params.double_quant
    assert bare.params.compute_dtype == "bfloat16"


@pytest.mark.parametrize("change, error, needle", [
    ({"bnb_4bit_quant_type": "int4"}, ConfigError, "'bnb_4bit_quant_type' = 'int4'"),
    ({"load_in_8bit": True, "_load_in_8bit": True}, ConfigError, "exactly one of load_in_4bit"),
    ({"load_in_4bit": False, "_load_in_4bit": False}, ConfigError, "exactly one of load_in_4bit"),
    ({"load_in_4bit": "yes"}, ConfigError, "'load_in_4bit' must be true or false"),
    ({"bnb_4bit_use_double_quant": 1}, ConfigError, "'bnb_4bit_use_double_quant'"),
    ({"bnb_4bit_compute_dtype": "float8"}, ConfigError, "'bnb_4bit_compute_dtype' = 'float8'"),
    ({"bnb_4bit_quant_storage": "complex64"}, ConfigError, "'bnb_4bit_quant_storage'"),
    ({"llm_int8_skip_modules": "lm_head"}, ConfigError, "'llm_int8_skip_modules' must be a list"),
    ({"llm_int8_threshold": "6"}, ConfigError, "'llm_int8_threshold' must be a number"),
])
def test_bad_settings_name_the_key(change, error, needle):
    detected = DetectedQuant("bitsandbytes", {**NF4, **change}, "/m/config.json")
    with pytest.raises(error) as err:
        resolve(detected, None)
    assert needle in err.value.message and err.value.where == "/m/config.json"


def test_int8_training_layout_is_refused():
    with pytest.raises(UnsupportedError, match="llm_int8_has_fp16_weight"):
        BitsAndBytesConfig.from_config({**INT8, "llm_int8_has_fp16_weight": True})


# -- skip lists -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, patterns, skipped", [
    ("lm_head", ("lm_head",), True),
    ("model.layers.1.mlp.down_proj", ("model.layers.1",), True),
    ("model.layers.11.mlp.down_proj", ("model.layers.1",), False),      # module boundary
    ("model.layers.3.mlp.down_proj", ("down_proj",), True),             # suffix
    ("model.visual.blocks.0.proj", ("visual",), True),                  # component
    ("model.layers.3.mlp.down_proj", (r"model\.layers\.[0-9]+\.mlp",), True),  # regex
    ("model.layers.3.mlp.gate_proj", ("mlp.gate",), False),
    ("model.layers.3.mlp.gate_proj", ("*mlp*",), True),                 # not a regex: wildcard
    ("model.layers.3.mlp.gate_proj", ("",), False),
])
def test_skip_list_matching(name, patterns, skipped):
    assert matches_any(name, patterns) is skipped


def test_skip_list_leaves_a_layer_in_float(tmp_path):
    """A module named in llm_int8_skip_modules loads from a plain float weight."""
    d = _copy(tmp_path, "bnb_nf4_dq")
    fx = load_fixture(FIXTURES / "bnb_nf4_dq")

    def to_float(t):
        for k in [k for k in t if k.startswith(LAYER + ".")]:
            del t[k]
        t[LAYER + ".weight"] = fx.dequant_refs()[LAYER].half()
    _edit_tensors(d, to_float)
    _edit_config(d, lambda q: q.update(llm_int8_skip_modules=["lm_head", "layers.1.mlp.down_proj"]))
    lm = _load(d)
    assert isinstance(lm.model.layers[1].mlp.down_proj.method, UnquantizedLinearMethod)
    assert not isinstance(lm.model.layers[0].mlp.down_proj.method, UnquantizedLinearMethod)
    ref = fx.reference
    err = (prompt_logits(lm, ref["input_ids"][0].tolist()) - ref["logits"][0]).abs().max()
    assert err < 5e-3


def test_explicit_skip_list_without_lm_head_quantizes_it(tmp_path):
    """As in transformers, a given skip list replaces the default (lm_head): this checkpoint's
    float lm_head then contradicts its settings, and the error says which tensor."""
    d = _copy(tmp_path, "bnb_nf4_dq")
    _edit_config(d, lambda q: q.update(llm_int8_skip_modules=[]))
    out = _error(d)
    assert "lm_head.weight" in out and "4-bit codes" in out


# -- online NF4 -------------------------------------------------------------------------------
def _nf4_round_trip(name, w):
    sd = bnb_format.quantize_4bit(w, "nf4", 64, double_quant=True)
    return bnb_format.dequantize_4bit_state_dict(sd).to(w.dtype)


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_online_nf4_equals_dequant_of_quant(tmp_path, kernels):
    base = make_tiny_model(tmp_path / "base", seed=3)
    expect = _load(replace_linears(base, tmp_path / "dq", _nf4_round_trip))
    lm = _load(base, "bitsandbytes", kernels)
    assert lm.quant_config.settings()["online"] is True
    qkv = lm.model.layers[0].self_attn.qkv_proj
    assert qkv.method.describe(qkv) == "bnb nf4 double-quant"
    assert lm.model.lm_head.method.describe(lm.model.lm_head) == "float32"
    assert torch.allclose(_logits(lm), _logits(expect), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(lm), _logits(_load(base)), atol=1e-3)  # it did quantize


def test_online_needs_an_unquantized_checkpoint(tmp_path):
    base = make_tiny_model(tmp_path / "base", seed=3)
    with pytest.raises(UnsupportedError, match="online LLM.int8"):
        _load(base, "bitsandbytes-8bit")
    with pytest.raises(ConfigError, match="contradicts the checkpoint, which is bitsandbytes"):
        _load(FIXTURES / "bnb_fp4", "fp8")
    assert _load(FIXTURES / "bnb_fp4", "bnb").quant_config.settings()["online"] is False


# -- kernels on odd shapes ------------------------------------------------------------------
def _linear(qc, cols, rows, name="model.layers.0.mlp.gate_up_proj"):
    from quantrt.models.layers import QuantLinear

    qc.policy = "auto"
    return QuantLinear(cols, rows, bias=False, quant_config=qc, prefix=name,
                       params_dtype=torch.float32, shard_names=["gate_proj", "up_proj"])


def _reference(layer) -> torch.Tensor:
    """The whole layer's weight from the format reference (before the kernel drops the
    on-disk tensors)."""
    return torch.cat([layer.method.reference(raw, rows, layer.input_size, "")
                      for raw, rows in zip(layer.raw_shards, layer.output_sizes)])


@pytest.mark.parametrize("quant_type, double_quant, storage, cols, rows", [
    ("nf4", True, "uint8", 23, [17, 6]),    # odd counts: padded last byte, partial block
    ("fp4", False, "uint8", 23, [17, 6]),
    ("fp4", False, "bfloat16", 24, [16, 6]),
    ("nf4", True, "float32", 24, [16, 6])])
def test_lut_kernel_equals_reference(quant_type, double_quant, storage, cols, rows):
    from quantrt.quant.bnb import BnbParams

    gen = torch.Generator().manual_seed(1)
    qc = BitsAndBytesConfig(BnbParams(4, quant_type, double_quant, quant_storage=storage))
    layer = _linear(qc, cols, rows)
    for shard, n in enumerate(rows):
        sd = bnb_format.quantize_4bit(torch.randn(n, cols, generator=gen).half(), quant_type,
                                      64, double_quant, storage=getattr(torch, storage))
        for name, t in sd.items():
            layer.load(name, t, shard)
    want = _reference(layer)
    layer.process_weights_after_loading(torch.device("cpu"))
    assert layer.kernel_choice.name.startswith("lut4")
    x = torch.randn(5, cols, generator=gen)
    assert torch.allclose(layer(x), x @ want.t(), atol=1e-5, rtol=1e-5)


def test_cpu_int8_kernel_equals_reference():
    from quantrt.quant.bnb import BnbParams

    gen = torch.Generator().manual_seed(2)
    layer = _linear(BitsAndBytesConfig(BnbParams(8)), 37, [19, 5])
    for shard, rows in enumerate((19, 5)):
        q, scb = bnb_format.quantize_int8(torch.randn(rows, 37, generator=gen))
        layer.load("weight", q, shard)
        layer.load("SCB", scb, shard)
        layer.load("weight_format", torch.tensor(0, dtype=torch.uint8), shard)
    want = _reference(layer)
    layer.process_weights_after_loading(torch.device("cpu"))
    assert layer.kernel_choice.name.startswith("cpu-int8pack")
    x = torch.randn(4, 37, generator=gen)
    assert torch.allclose(layer(x), x @ want.t(), atol=1e-4, rtol=1e-4)


def test_int8_is_the_weight_only_product():
    """The 0.075 logit gap to bitsandbytes (tolerance map in test_quant_methods) is all its
    activation quantization: against a float32 transformers forward with the dequantized
    int8 weights, quantrt agrees to float32 rounding."""
    import transformers

    fx = load_fixture(FIXTURES / "bnb_int8")
    cfg = json.loads((FIXTURES / "bnb_int8" / "config.json").read_text())
    cfg.pop("quantization_config")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    state = {}
    for name, t in fx.tensors.items():
        if name.endswith(("SCB", "weight_format")):
            continue
        scb = fx.tensors.get(name.removesuffix("weight") + "SCB")
        state[name] = bnb_format.dequantize_int8(t, scb) if scb is not None else t.float()
    model.load_state_dict(state, strict=True)
    model.config._attn_implementation = "eager"
    ids = fx.reference["input_ids"]
    with torch.no_grad():
        hf = model(ids).logits
    for kernels in ("reference", "auto"):
        lm = _load(FIXTURES / "bnb_int8", kernels=kernels)
        for b, row in enumerate(ids):
            assert (prompt_logits(lm, row.tolist()) - hf[b]).abs().max() < 1e-4


# -- bad checkpoints --------------------------------------------------------------------------
STATE = f"{LAYER}.weight.quant_state.bitsandbytes__nf4"


def _set_state(t, **meta):
    old = bnb_format.parse_quant_state(t[STATE])
    t[STATE] = bnb_format.build_quant_state({**old, **meta})


CASES = {
    "missing absmax": ("bnb_nf4_dq", lambda t: t.pop(f"{LAYER}.weight.absmax"), None,
                       [f"{LAYER}.weight.absmax", "lacks"]),
    "missing nested absmax": ("bnb_nf4_dq", lambda t: t.pop(f"{LAYER}.weight.nested_absmax"),
                              None, [f"{LAYER}.weight.nested_absmax", "lacks"]),
    "quant_state shape": ("bnb_nf4_dq", lambda t: _set_state(t, shape=[336, 128]), None,
                          [STATE, "[336, 128]", f"{LAYER}.weight is [128, 336]"]),
    "quant_state blocksize": ("bnb_nf4_dq", lambda t: _set_state(t, blocksize=128), None,
                              [f"{LAYER}.weight.absmax", "672 entries", "expected 336", STATE]),
    "quant_state not json": ("bnb_nf4_dq",
                             lambda t: t.update({STATE: torch.tensor([1, 2], dtype=torch.uint8)}),
                             None, [STATE, "JSON"]),
    "absmax dtype": ("bnb_nf4_dq",
                     lambda t: t.update({f"{LAYER}.weight.absmax":
                                         t[f"{LAYER}.weight.absmax"].float()}),
                     None, [f"{LAYER}.weight.absmax", "float32", "uint8"]),
    "packed weight shape": ("bnb_fp4",
                            lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"][:-2]}),
                            None, [f"{LAYER}.weight", "shape", "(21504, 1)"]),
    "non-finite absmax": ("bnb_fp4",
                          lambda t: t[f"{LAYER}.weight.absmax"].__setitem__(3, float("nan")),
                          None, [f"{LAYER}.weight.absmax", "non-finite"]),
    "fp4 file, nf4 settings": ("bnb_fp4", None, lambda q: q.update(bnb_4bit_quant_type="nf4"),
                               ["bitsandbytes__fp4", "unexpected"]),
    "double quant not declared": ("bnb_nf4_dq", None,
                                  lambda q: q.update(bnb_4bit_use_double_quant=False),
                                  ["weight.absmax", "uint8", "float32"]),
    "missing SCB": ("bnb_int8", lambda t: t.pop(f"{LAYER}.SCB"), None, [f"{LAYER}.SCB", "lacks"]),
    "int8 weight dtype": ("bnb_int8",
                          lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"].half()}),
                          None, [f"{LAYER}.weight", "float16", "int8"]),
    "tiled int8 layout": ("bnb_int8", lambda t: t.update(
        {f"{LAYER}.weight_format": torch.tensor(2, dtype=torch.uint8)}), None,
        [f"{LAYER}.weight_format", "col_turing", "not supported"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_gets_clear_error(tmp_path, case):
    assert_bad_checkpoint(tmp_path, *CASES[case])


def test_fused_shard_error_names_the_checkpoint_tensor(tmp_path):
    d = _copy(tmp_path, "bnb_nf4_dq")
    k_state = STATE.replace("layers.1.mlp.down_proj", "layers.0.self_attn.k_proj")
    _edit_tensors(d, lambda t: t.update({k_state: bnb_format.build_quant_state(
        {**bnb_format.parse_quant_state(t[k_state]), "shape": [128, 128]})}))
    out = _error(d)
    assert k_state in out and "qkv_proj" not in out and "[64, 128]" in out


# -- inspect ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, settings, kernel", [
    ("bnb_nf4_dq", {"bits": 4, "quant_type": "nf4", "double_quant": True}, "lut4"),
    ("bnb_fp4", {"bits": 4, "quant_type": "fp4", "double_quant": False}, "lut4"),
    ("bnb_int8", {"bits": 8, "llm_int8_threshold": 6.0}, "cpu-int8pack"),
])
def test_inspect_json_reports_the_settings(name, settings, kernel):
    from quantrt.cli import main

    res = CliRunner().invoke(main, ["inspect", "--json", "--device", "cpu", str(FIXTURES / name)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    q = report["quantization"]
    assert q["method"] == "bitsandbytes" and q["skip_modules"] == ["lm_head"]
    assert settings.items() <= q.items()
    down = report["layers"]["mlp.down_proj"]
    assert down["kernel"].startswith(kernel) and down["weight_format"].startswith("bnb")
    assert report["layers"]["lm_head"]["weight_format"] == "float32"  # unquantized, CPU dtype


# -- GPU --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name, kernel, tol", [
    ("bnb_nf4_dq", "lut4", 0.06), ("bnb_fp4", "lut4", 0.06),
    ("bnb_int8", "triton-wq", 0.1)])  # int8: the LLM.int8 gap (test_quant_methods' map)
def test_gpu_kernels_match_the_library(name, kernel, tol):
    from quantrt.loader import load

    lm = load(FIXTURES / name, kernels="auto", device="cuda", dtype="float16", progress=False)
    assert lm.model.layers[0].mlp.down_proj.kernel_choice.name.startswith(kernel)
    ref = load_fixture(FIXTURES / name).reference
    for b, row in enumerate(ref["input_ids"]):
        assert (prompt_logits(lm, row.tolist()) - ref["logits"][b]).abs().max() < tol
