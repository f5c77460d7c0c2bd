"""Broken or inconsistent quantized checkpoints fail with one clear error naming the tensor
(or setting) at fault, through the CLI as well as the API."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tests.fixture_util import FIXTURES


def _copy(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _edit_tensors(d, fn):
    path = d / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def _edit_config(d, fn):
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))
    side = d / "quantize_config.json"
    if side.exists():
        qc = json.loads(side.read_text())
        fn(qc)
        side.write_text(json.dumps(qc))


def _error(d) -> str:
    from quantrt.cli import main

    res = CliRunner().invoke(main, ["inspect", str(d)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return res.output


LAYER = "model.layers.1.mlp.down_proj"
CASES = {
    "missing qzeros": ("gptq_v1_4bit_g32_sym", lambda t: t.pop(f"{LAYER}.qzeros"), None,
                       [f"{LAYER}.qzeros", "lacks"]),
    "missing awq scales": ("awq_gemm_g64", lambda t: t.pop(f"{LAYER}.scales"), None,
                           [f"{LAYER}.scales"]),
    "scales disagree with group size": (
        "gptq_v1_4bit_g32_sym", None, lambda q: q.update(group_size=64),
        ["shape", "group_size=64", "do not match"]),
    "awq gemv declared as gemm": ("awq_gemv_g64", None, lambda q: q.update(version="gemm"),
                                  ["qweight", "shape"]),
    "unknown bits": ("gptq_v1_4bit_g32_sym", None, lambda q: q.update(bits=5),
                     ["bits", "5"]),
    "awq 8-bit": ("awq_gemm_g64", None, lambda q: q.update(bits=8), ["AWQ", "8-bit"]),
    "negative group size": ("gptq_v1_4bit_g32_sym", None, lambda q: q.update(group_size=-7),
                            ["group_size"]),
    "qweight dtype": ("gptq_v1_4bit_g32_sym",
                      lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"].float()}),
                      None, [f"{LAYER}.qweight", "dtype"]),
    "unknown checkpoint_format": ("gptq_v1_4bit_g32_sym", None,
                                  lambda q: q.update(checkpoint_format="gptq_v9"),
                                  ["checkpoint_format"]),
    "bad dynamic regex": ("gptq_v1_4bit_g32_sym", None, lambda q: q.update(dynamic={"-:(": {}}),
                          ["dynamic", "regex"]),
    "unexpected tensor": ("awq_gemm_g64",
                          lambda t: t.update({f"{LAYER}.g_idx": t[f"{LAYER}.qweight"][:, 0].clone()}),
                          None, [f"{LAYER}.g_idx", "unexpected"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_gets_clear_error(tmp_path, case):
    name, tensors, config, needles = CASES[case]
    d = _copy(tmp_path, name)
    if tensors:
        _edit_tensors(d, tensors)
    if config:
        _edit_config(d, config)
    out = _error(d)
    for needle in needles:
        assert needle in out, out


def test_dynamic_rule_skips_module(tmp_path):
    """GPTQModel's "-:regex" leaves matching modules unquantized: they then need a float
    weight, and the error says which tensor is missing."""
    d = _copy(tmp_path, "gptq_v1_4bit_g32_sym")
    _edit_config(d, lambda q: q.update(dynamic={r"-:.*\.1\.mlp\.down_proj": {}}))
    out = _error(d)
    assert f"{LAYER}." in out and "unquantized layer" in out
