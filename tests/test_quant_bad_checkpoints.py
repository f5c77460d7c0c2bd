"""Broken or inconsistent quantized checkpoints fail with one clear error naming the tensor
(or setting) at fault, through the CLI as well as the API."""
from __future__ import annotations

import pytest

from tests.fixture_util import assert_bad_checkpoint, cli_error, copy_fixture, edit_config


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
    assert_bad_checkpoint(tmp_path, *CASES[case])


def test_dynamic_rule_skips_module(tmp_path):
    """GPTQModel's "-:regex" leaves matching modules unquantized: they then need a float
    weight, and the error says which tensor is missing."""
    d = copy_fixture(tmp_path, "gptq_v1_4bit_g32_sym")
    edit_config(d, lambda q: q.update(dynamic={r"-:.*\.1\.mlp\.down_proj": {}}))
    out = cli_error(d)
    assert f"{LAYER}." in out and "unquantized layer" in out
