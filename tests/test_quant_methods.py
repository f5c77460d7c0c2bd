"""Every golden fixture (written by the reference library itself) loads through the registry
with its weights kept packed, and our logits match the library's own.

Tolerances (max |logit difference|, logits span ~7):
* reference kernels: 5e-3 for weight-only methods -- the libraries run fp16 forwards, we run
  fp32 with bit-identical dequantized weights (MANIFEST's reference_vs_dequant_fp32_forward
  measures the same gap, 3.5e-3 to 4.5e-3); 0.2 for methods that also quantize activations
  at inference (the fixture's notes say which);
* fast CPU kernels (tinygemm: bf16 activations and scales): 0.06.
"""
from __future__ import annotations

import json

import pytest
import torch

from quantrt.errors import UnsupportedError

from tests.fixture_util import FIXTURES, load_fixture, prompt_logits

MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())["fixtures"]


def _implemented(name: str) -> bool:
    """Whether the fixture's method is registered (methods land one by one)."""
    from quantrt.quant.base import config_class
    from quantrt.quant.detect import detect_hf, read_json

    d = FIXTURES / name
    method = detect_hf(str(d), read_json(str(d / "config.json"))).method
    try:
        config_class(method)
    except UnsupportedError:
        return False
    return method != "none"  # every fixture is quantized


NAMES = sorted(n for n in MANIFEST if _implemented(n))
# Storage bits per weight of each fixture (for the "stays packed" check).
BITS = {"bnb_int8": 8, "ct_w8a16_channel": 8, "ct_fp8_block": 8, "ct_fp8_dynamic": 8,
        "fp8_block128": 8, "fp8_per_tensor": 8, "gptq_v1_8bit_gcol": 8}
REF_TOL = 5e-3
FAST_TOL = 0.06
# Fixtures whose library forward is not weight-only, with measured max |logit diff|:
# bnb_int8: bitsandbytes' LLM.int8 forward also quantizes activations row-wise to int8
# (columns above llm_int8_threshold 6.0 kept in fp16); quantrt multiplies by the dequantized
# int8 weights.  Measured 0.0753 with both kernel policies -- the same gap as MANIFEST's
# reference_vs_dequant_fp32_forward (0.0753), i.e. all of it is the activation quantization.
# hqq_3bit_g64: HQQ subtracts its float zero point in fp16 before scaling; quantrt keeps the
# subtraction exact (fp32), so ~0.1% of the weights differ by up to 1.4e-4 (one fp16 ulp).
# Measured 4.96e-3 with reference kernels (MANIFEST's fp32 forward over HQQ's own fp16
# dequant: 4.0e-3), too close to 5e-3 to be a stable bound.
# ct_fp8_dynamic / ct_fp8_block: the library's forward also quantizes activations to FP8 (per
# token / per group of 128), which quantrt emulates bit-exactly (checked against
# compressed-tensors in test_quant_compressed_tensors.py); its fp16 forward still lands on
# the other side of some e4m3 roundings than our fp32 one.  Measured 0.184 / 0.165 with
# both kernel policies (weight-only, without the emulation: 0.206 / 0.180; quantrt in fp16:
# 0.162 / 0.173), so the 0.2 for activation-quantized FP8.
TOL = {"bnb_int8": {"reference": 0.08, "auto": 0.08},
       "hqq_3bit_g64": {"reference": 6e-3},
       "ct_fp8_dynamic": {"reference": 0.2, "auto": 0.2},
       "ct_fp8_block": {"reference": 0.2, "auto": 0.2}}
# Max |weight difference| allowed where the library's own dequant rounds differently (the
# rest are bit-exact after rounding to fp16).  HQQ: the fp16 zero-point subtraction above;
# measured on model.layers.1.mlp.down_proj: 67 of 43008 values differ at fp16, by at most
# 1.36e-4 (hqq_3bit_g64), and 123 by at most 1.34e-4 (hqq_4bit_g64_axis1).
DEQUANT_TOL = {"hqq_3bit_g64": 2e-4, "hqq_4bit_g64_axis1": 2e-4}


def _load(name: str, kernels: str):
    from quantrt.loader import load

    return load(FIXTURES / name, kernels=kernels, device="cpu", progress=False)


def _max_err(lm, ref) -> float:
    errs = [(prompt_logits(lm, row.tolist()) - ref["logits"][b]).abs().max().item()
            for b, row in enumerate(ref["input_ids"])]
    return max(errs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kernels,tol", [("reference", REF_TOL), ("auto", FAST_TOL)])
def test_logits_match_reference_library(name, kernels, tol):
    fx = load_fixture(FIXTURES / name)
    lm = _load(name, kernels)
    assert _max_err(lm, fx.reference) < TOL.get(name, {}).get(kernels, tol)


@pytest.mark.parametrize("name", NAMES)
def test_reference_dequant_is_bit_exact(name):
    """The one layer whose dequantized weight the library saved: equal after rounding to the
    library's fp16 compute dtype (it dequantizes in fp16; we keep fp32)."""
    fx = load_fixture(FIXTURES / name)
    lm = _load(name, "reference")
    for module, want in fx.dequant_refs().items():
        layer = lm.model.resolve(module + ".weight")[0]
        got = layer.method.reference(layer.raw_shards[0], layer.output_sizes[0],
                                     layer.input_size, module)
        if name in DEQUANT_TOL:
            assert (got - want).abs().max().item() <= DEQUANT_TOL[name]
        else:
            assert torch.equal(got.half(), want.half())


@pytest.mark.parametrize("name", NAMES)
def test_canonical_int_form_equals_format_reference(name):
    lm = _load(name, "reference")
    checked = 0
    for layer in lm.model.modules():
        if getattr(layer, "raw_shards", None) is None:
            continue
        for raw, rows in zip(layer.raw_shards, layer.output_sizes):
            ref = layer.method.reference(raw, rows, layer.input_size, layer.prefix)
            canon = layer.method.to_int(raw, rows, layer.input_size, layer.prefix)
            if canon is None:
                continue  # not an integer-affine format (fp8, nf4)
            assert torch.equal(canon.dequantize(), ref)
            checked += 1
    assert checked in (0, 14)  # none or 7 linears x 2 layers


@pytest.mark.parametrize("name", NAMES)
def test_weights_stay_packed(name):
    """Loaded linear weights take at most bits/16 of their fp16 size plus scale overhead."""
    from quantrt.quant.base import layer_tensors

    lm = _load(name, "auto")
    bits = BITS.get(name, 4)
    for layer in lm.model.layers.modules():
        if hasattr(layer, "output_sizes"):
            dense = layer.output_size * layer.input_size * 2
            held = sum(t.numel() * t.element_size() for t in layer_tensors(layer))
            assert held <= dense * (max(bits, 4) / 16 + 0.2), layer.prefix


def test_fast_kernel_chosen_and_refusals_explained():
    lm = _load("gptq_v1_4bit_g32_sym", "auto")
    choice = lm.model.layers[0].mlp.down_proj.kernel_choice
    assert choice.name.startswith("cpu-int4pack")
    assert any("CUDA" in why for _, why in choice.refused)
    lm8 = _load("gptq_v1_8bit_gcol", "auto")
    refused = dict(lm8.model.layers[0].mlp.down_proj.kernel_choice.refused)
    assert "8-bit" in refused["cpu-int4pack (tinygemm, bf16 activations)"]
