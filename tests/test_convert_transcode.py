"""Lossless transcodes: integer checkpoints rewritten in another integer format, and every
quantized format dequantized to float, hold bit for bit the weights of their source
(both sides dequantized by the formats' own reference math); what a target cannot hold
exactly is refused before anything is written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from quantrt.convert import ConvertRequest, convert
from quantrt.convert.source import is_linear_weight, open_source
from quantrt.errors import UnsupportedError
from quantrt.loader import load
from tests.fixture_util import FIXTURES, prompt_logits
from tests.tiny_models import make_tiny_model, save_bpe_tokenizer

IDS = list(range(5, 45))


def _linears_equal(a_path, b_path) -> int:
    a, b = open_source(a_path), open_source(b_path)
    names = [n for n in a.names if is_linear_weight(n, a.shape(n))]
    assert names and sorted(names) == sorted(n for n in b.names if is_linear_weight(n, b.shape(n)))
    for n in names:
        wa, wb = a.get(n), b.get(n)
        assert wa.dtype == wb.dtype == torch.float32
        assert torch.equal(wa, wb), n
    return len(names)


@pytest.mark.parametrize("fixture,method,kw,detected", [
    ("gptq_v1_4bit_g32_sym", "awq", dict(group_size=32), "awq"),
    ("awq_gemm_g64", "gptq", dict(group_size=64, sym=False), "gptq"),
    ("awq_gemm_g64", "ct-w4a16", dict(group_size=64, sym=False), "compressed-tensors"),
    ("ct_w4a16_asym", "gptq", dict(sym=False), "gptq"),
    ("ct_w4a16_asym", "awq", {}, "awq"),
    ("ct_w4a16_group", "gptq", dict(group_size=32), "gptq"),
    ("ct_w8a16_channel", "gptq", dict(bits=8, group_size=-1), "gptq"),
])
def test_int_transcode_is_bit_exact(tmp_path, fixture, method, kw, detected):
    out = tmp_path / "out"
    convert(str(FIXTURES / fixture), out, ConvertRequest(method, **kw), progress=False)
    assert _linears_equal(str(FIXTURES / fixture), str(out)) == 14
    lm = load(str(out), device="cpu", progress=False)
    assert lm.detected.method == detected
    ref = prompt_logits(load(str(FIXTURES / fixture), device="cpu", progress=False), IDS)
    # same weights; only the kernels' summation order differs
    assert (prompt_logits(lm, IDS) - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_any_quantized_checkpoint_dequantizes_exactly(tmp_path, fixture):
    out = tmp_path / "fp"
    convert(str(FIXTURES / fixture), out, ConvertRequest("fp16", dtype="float32"),
            progress=False)
    _linears_equal(str(FIXTURES / fixture), str(out))
    assert load(str(out), device="cpu", progress=False).detected.method == "none"


def test_act_order_source_to_awq_and_mismatches_are_refused_before_work(tmp_path):
    src = str(FIXTURES / "gptq_v1_4bit_g128_asym_descact")
    with pytest.raises(UnsupportedError, match="act-order.*no g_idx"):
        convert(src, tmp_path / "a", ConvertRequest("awq"), progress=False)
    with pytest.raises(UnsupportedError, match="--group-size 64 --asym"):
        convert(str(FIXTURES / "awq_gemm_g64"), tmp_path / "b", ConvertRequest("gptq"),
                progress=False)
    with pytest.raises(UnsupportedError, match="zero points"):
        convert(str(FIXTURES / "awq_gemm_g64"), tmp_path / "c",
                ConvertRequest("ct-w4a16", group_size=64, sym=True), progress=False)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tx")
    src = make_tiny_model(root / "src", hidden_size=64, intermediate_size=96,
                          num_attention_heads=4, num_key_value_heads=2)
    save_bpe_tokenizer(src)
    out = {}
    for t in ("Q4_0", "Q8_0"):
        out[t] = root / f"m-{t}.gguf"
        convert(str(src), out[t], ConvertRequest("gguf", gguf_type=t), progress=False)
    return out


@pytest.mark.parametrize("gguf_type,method,kw", [
    ("Q4_0", "gptq", dict(group_size=32)),
    ("Q4_0", "ct-w4a16", dict(group_size=32)),
    ("Q4_0", "awq", dict(group_size=32)),
    ("Q8_0", "gptq", dict(bits=8, group_size=32)),
    ("Q8_0", "ct-w8a16", dict(group_size=32)),
])
def test_gguf_int_blocks_transcode_bit_exactly(ggufs, tmp_path, gguf_type, method, kw):
    out = tmp_path / "out"
    convert(str(ggufs[gguf_type]), out, ConvertRequest(method, **kw), progress=False)
    _linears_equal(str(ggufs[gguf_type]), str(out))
    ref = prompt_logits(load(str(ggufs[gguf_type]), device="cpu", progress=False), IDS)
    got = prompt_logits(load(str(out), device="cpu", progress=False), IDS)
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()  # fp16 vs fp32 activations


def test_gguf_transcode_refusals(ggufs, tmp_path):
    # fp16 block scales do not all survive bf16; group 128 would re-quantize
    with pytest.raises(UnsupportedError, match="not exactly representable in bfloat16"):
        convert(str(ggufs["Q4_0"]), tmp_path / "a",
                ConvertRequest("ct-w4a16", group_size=32, dtype="bfloat16"), progress=False)
    with pytest.raises(UnsupportedError, match="4-bit group 32 symmetric"):
        convert(str(ggufs["Q4_0"]), tmp_path / "b", ConvertRequest("gptq"), progress=False)
    assert os.listdir(tmp_path) == []
