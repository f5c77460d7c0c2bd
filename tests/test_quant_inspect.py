"""`quantrt inspect --json` on every golden fixture reports the method and the settings the
reference library was asked for (tests/fixtures/MANIFEST.json), and names a kernel for
every layer kind."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.fixture_util import FIXTURES

MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())["fixtures"]
CT_SCHEMES = {"W4A16_ASYM": (4, "group"), "FP8_DYNAMIC": (8, "channel"), "FP8_BLOCK": (8, "block")}


def expected(name: str, s: dict) -> tuple[str, dict]:
    """(method, {setting: value}) that inspect must show for fixture ``name``."""
    if name.startswith("awq"):
        return "awq", {"bits": s["w_bit"], "group_size": s["q_group_size"],
                       "version": s["version"].lower()}
    if name.startswith("gptq"):
        return "gptq", {k: s[k] for k in ("bits", "group_size", "sym", "desc_act")}
    if name.startswith("marlin"):
        return "marlin", {"bits": 4, "group_size": s["group_size"], "sym": True}
    if name.startswith("bnb"):
        if s.get("load_in_8bit"):
            return "bitsandbytes", {"bits": 8}
        return "bitsandbytes", {"bits": 4, "quant_type": s["bnb_4bit_quant_type"],
                                "double_quant": s["bnb_4bit_use_double_quant"]}
    if name.startswith("fp8"):
        block = s["weight_block_size"]
        return "fp8", {"weight_scales": "block" if block else "per-tensor",
                       "activation_scheme": s["activation_scheme"],
                       **({"weight_block_size": block} if block else {})}
    if name.startswith("hqq"):
        b = s["BaseQuantizeConfig"]
        return "hqq", {"nbits": b["nbits"], "group_size": b["group_size"], "axis": b["axis"]}
    assert name.startswith("ct_")
    return "compressed-tensors", {}


def _ct_weights(q: dict) -> dict:
    (group,) = q["config_groups"].values()
    return group["weights"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_inspect_reports_fixture_settings(name):
    from quantrt.cli import main

    res = CliRunner().invoke(main, ["inspect", str(FIXTURES / name), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    q = report["quantization"]
    method, want = expected(name, MANIFEST[name]["settings"])
    assert q["method"] == method
    for key, value in want.items():
        assert q[key] == value, (key, q)
    if name.startswith("ct_"):
        w = _ct_weights(q)
        s = MANIFEST[name]["settings"]
        if "scheme" in s:
            bits, strategy = CT_SCHEMES[s["scheme"]]
        else:
            sw = s["config_groups"]["group_0"]["weights"]
            bits, strategy = sw["num_bits"], sw["strategy"]
        assert (w["num_bits"], w["strategy"]) == (bits, strategy)
    kinds = report["layers"]
    assert {"self_attn.qkv_proj", "mlp.down_proj", "lm_head"} <= set(kinds)
    assert all(e["kernel"] for e in kinds.values())
