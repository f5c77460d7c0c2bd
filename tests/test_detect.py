"""Quantization detection from config.json and the side files producers write, and its
reconciliation with --quantization."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantrt.errors import ConfigError, FormatError, SourceError, UnsupportedError
from quantrt.quant.base import canonical_method, config_class
from quantrt.quant.detect import DetectedQuant, detect_hf, read_json, resolve

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64}


def _dir(tmp_path: Path, config: dict, **side_files: dict) -> tuple[str, dict]:
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, content in side_files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return str(tmp_path), config


def detect(tmp_path: Path, config: dict, **side_files: dict) -> DetectedQuant:
    return detect_hf(*_dir(tmp_path, config, **side_files))


def test_unquantized(tmp_path):
    d = detect(tmp_path, LLAMA)
    assert d == DetectedQuant("none", {}, str(tmp_path / "config.json"))


@pytest.mark.parametrize("qc, method", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}, "awq"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "gptq"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors"),
    ({"quant_method": "Compressed_Tensors"}, "compressed-tensors"),
    ({"_load_in_4bit": True, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bitsandbytes"),
    ({"load_in_8bit": True, "quant_method": "bitsandbytes"}, "bitsandbytes"),
    ({"quant_method": "aqlm", "nbits_per_codebook": 16}, "aqlm"),
])
def test_quantization_config_in_config_json(tmp_path, qc, method):
    d = detect(tmp_path, {**LLAMA, "quantization_config": qc})
    assert d.method == method and d.settings == qc and d.where == str(tmp_path / "config.json")


def test_compression_config_defaults_to_compressed_tensors(tmp_path):
    cc = {"config_groups": {"group_0": {"targets": ["Linear"]}}, "format": "float-quantized"}
    assert detect(tmp_path, {**LLAMA, "compression_config": cc}).method == "compressed-tensors"
    named = {**cc, "quant_method": "sparseml"}
    assert detect(tmp_path, {**LLAMA, "compression_config": named}).method == "sparseml"


def test_quantization_config_inside_text_config(tmp_path):
    cfg = {"architectures": ["LlavaForConditionalGeneration"],
           "text_config": {**LLAMA, "quantization_config": {"quant_method": "awq", "bits": 4}}}
    d = detect(tmp_path, cfg)
    assert d.method == "awq" and d.where == str(tmp_path / "config.json")


def test_autogptq_quantize_config_json(tmp_path):
    side = {"bits": 4, "group_size": 128, "desc_act": True, "sym": True}
    d = detect(tmp_path, LLAMA, quantize_config=side)
    assert d.method == "gptq" and d.settings["bits"] == 4
    assert d.where == str(tmp_path / "quantize_config.json")


def test_autoawq_quant_config_json(tmp_path):
    side = {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}
    d = detect(tmp_path, LLAMA, quant_config=side)
    assert d.method == "awq" and d.where == str(tmp_path / "quant_config.json")


def test_side_file_with_its_own_method(tmp_path):
    d = detect(tmp_path, LLAMA, quant_config={"quant_method": "AWQ", "w_bit": 4})
    assert d.method == "awq"


@pytest.mark.parametrize("algo, method", [("FP8", "modelopt"), ("NVFP4", "modelopt-fp4")])
def test_modelopt_hf_quant_config_json(tmp_path, algo, method):
    side = {"producer": {"name": "modelopt", "version": "0.19.0"},
            "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None}}
    d = detect(tmp_path, LLAMA, hf_quant_config=side)
    assert d.method == method and d.settings["quant_algo"] == algo
    assert d.where == str(tmp_path / "hf_quant_config.json")


def test_config_json_wins_over_side_files(tmp_path):
    d = detect(tmp_path, {**LLAMA, "quantization_config": {"quant_method": "fp8"}},
               quantize_config={"bits": 4})
    assert d.method == "fp8"


@pytest.mark.parametrize("config, side, where, needle", [
    ({**LLAMA, "quantization_config": {"bits": 4}}, {}, "config.json", "no 'quant_method'"),
    ({**LLAMA, "quantization_config": {"quant_method": ""}}, {}, "config.json", "no 'quant_method'"),
    (LLAMA, {"quant_config": {"group_size": 128}}, "quant_config.json", "no 'quant_method'"),
    (LLAMA, {"hf_quant_config": {"producer": {"name": "other"}, "quantization": [1]}},
     "hf_quant_config.json", "'quantization' must be a JSON object"),
])
def test_settings_without_a_method(tmp_path, config, side, where, needle):
    with pytest.raises(ConfigError) as err:
        detect(tmp_path, config, **side)
    assert err.value.where == str(tmp_path / where) and needle in err.value.message


@pytest.mark.parametrize("text, error, needle", [
    ('{"bits": 4,', FormatError, "not valid JSON"),
    ("[4]", FormatError, "JSON object"),
    ("[" * 100000, FormatError, "JSON"),
])
def test_read_json_errors(tmp_path, text, error, needle):
    path = tmp_path / "quantize_config.json"
    path.write_text(text)
    with pytest.raises(error, match=needle) as err:
        read_json(str(path))
    assert err.value.where == str(path)


def test_read_json_on_a_directory(tmp_path):
    with pytest.raises(SourceError, match="cannot read file") as err:
        read_json(str(tmp_path))
    assert err.value.where == str(tmp_path)


# -- method names and --quantization ---------------------------------------------------------
def test_method_names():
    assert canonical_method("GGUF") == "gguf" and canonical_method("unquantized") == "none"
    assert canonical_method("awq_marlin") == "awq" and canonical_method("GPTQ_Marlin") == "gptq"
    with pytest.raises(ConfigError, match="unknown quantization method 'foo'") as err:
        canonical_method("foo", "here")
    assert err.value.where == "here" and "gguf" in err.value.hint and "gptq" in err.value.hint
    with pytest.raises(ConfigError, match="non-empty string"):
        canonical_method("  ")
    with pytest.raises(UnsupportedError, match="AQLM"):
        config_class("aqlm")


GGUF = DetectedQuant("gguf", {"file_type": 3, "tensor_types": {}}, "/m.gguf")
NONE = DetectedQuant("none", {}, "/m/config.json")


def test_resolve_without_override():
    assert resolve(GGUF, None).name == "gguf"
    assert resolve(NONE, None).name == "none"


@pytest.mark.parametrize("detected, override", [(GGUF, "gguf"), (GGUF, "GGUF"),
                                                (NONE, "none"), (NONE, "unquantized")])
def test_agreeing_override(detected, override):
    assert resolve(detected, override).name == detected.method


@pytest.mark.parametrize("detected, override, needle", [
    (NONE, "awq", "--quantization awq contradicts the checkpoint, which is unquantized"),
    (NONE, "gguf", "which is unquantized"),
    (GGUF, "none", "which is gguf"),
    (GGUF, "gptq-marlin", "which is gguf"),
])
def test_contradicting_override(detected, override, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        resolve(detected, override)
    assert err.value.where == detected.where


def test_unknown_override_names_the_model():
    with pytest.raises(ConfigError, match="unknown quantization method 'foo'") as err:
        resolve(NONE, "foo")
    assert err.value.where == NONE.where


def test_kernel_names_select_the_same_format():
    gptq = DetectedQuant("gptq", {"bits": 4}, "/m/quantize_config.json")
    for override in (None, "gptq", "gptq_marlin"):  # same format: no contradiction
        assert resolve(gptq, override).params.bits == 4
    with pytest.raises(ConfigError, match="contradicts"):
        resolve(gptq, "awq")


def test_recognised_but_unsupported_checkpoint():
    aqlm = DetectedQuant("aqlm", {"nbits_per_codebook": 16}, "/m/config.json")
    with pytest.raises(UnsupportedError, match="'aqlm' is recognised but not supported") as err:
        resolve(aqlm, None)
    assert err.value.where == aqlm.where


def test_unknown_detected_method_names_its_file():
    with pytest.raises(ConfigError, match="unknown quantization method 'foo'") as err:
        resolve(DetectedQuant("foo", {}, "/m/config.json"), None)
    assert err.value.where == "/m/config.json"


def test_where_falls_back_to_the_model():
    with pytest.raises(ConfigError) as err:
        resolve(DetectedQuant("none", {}, None), "awq", "/models/m")
    assert err.value.where == "/models/m"
