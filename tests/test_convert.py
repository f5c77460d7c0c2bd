"""quantrt convert, round-to-nearest: every writer's output loads back (quantrt's loaders,
the same layouts the reference libraries write) with the weights it was meant to hold;
bad requests fail before any work; an interrupted run leaves nothing behind."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantrt.convert import ConvertRequest, convert
from quantrt.convert.intq import rtn
from quantrt.errors import ConfigError, QuantrtError, SourceError, UnsupportedError
from quantrt.loader import load
from tests.fixture_util import FIXTURES, prompt_logits
from tests.tiny_models import make_tiny_model, save_bpe_tokenizer

IDS = list(range(5, 45))
LAYER = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = make_tiny_model(tmp_path_factory.mktemp("cv") / "src", hidden_size=64,
                           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    save_bpe_tokenizer(path)  # merges: a GGUF vocabulary needs them
    return path


@pytest.fixture(scope="module")
def ref_logits(src) -> torch.Tensor:
    return prompt_logits(load(str(src), device="cpu", progress=False), IDS)


def _convert(src, tmp_path, method, **kw) -> Path:
    out = tmp_path / f"out-{method}"
    convert(str(src), out, ConvertRequest(method, **kw), progress=False)
    return out


# method, options, detected method, max |logit diff| / logit range
CASES = [
    ("gptq", dict(algo="rtn", group_size=32), "gptq", 0.2),
    ("gptq", dict(algo="rtn", bits=8, group_size=-1, sym=False), "gptq", 0.02),
    ("awq", dict(algo="rtn", group_size=32), "awq", 0.2),
    ("ct-w4a16", dict(group_size=32, sym=False), "compressed-tensors", 0.2),
    ("ct-w8a16", {}, "compressed-tensors", 0.02),
    ("ct-fp8", {}, "compressed-tensors", 0.06),
    ("fp8", dict(fp8_scheme="block"), "fp8", 0.06),
    ("fp8", dict(fp8_scheme="channel"), "fbgemm-fp8", 0.06),
    ("bnb-nf4", dict(double_quant=True), "bitsandbytes", 0.2),
    ("bnb-int8", {}, "bitsandbytes", 0.02),
    ("hqq", dict(group_size=32, bits=3), "hqq", 0.4),
    ("bf16", {}, "none", 0.01),
]


@pytest.mark.parametrize("method,kw,detected,tol", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_round_trip_logits(src, ref_logits, tmp_path, method, kw, detected, tol):
    out = _convert(src, tmp_path, method, **kw)
    lm = load(str(out), device="cpu", progress=False)
    assert lm.detected.method == detected
    diff = (prompt_logits(lm, IDS) - ref_logits).abs().max() / ref_logits.abs().max()
    assert diff < tol
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_int_layouts_dequantize_to_the_rtn_weights(src, tmp_path):
    """GPTQ / AWQ / compressed-tensors tensors hold exactly the RTN weights (fp16 scales)."""
    from formats import awq, compressed_tensors as ct, gptq

    w = load_file(src / "model.safetensors")[f"{LAYER}.weight"].float()
    sym = rtn(w, 4, 32, True).dequantize()
    asym = rtn(w, 4, 32, False).dequantize()
    t = load_file(_convert(src, tmp_path, "gptq", algo="rtn", group_size=32) / "model.safetensors")
    got = gptq.dequantize(*(t[f"{LAYER}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")),
                          4, 32, 1, dtype=torch.float32)
    assert torch.equal(got, sym)
    t = load_file(_convert(src, tmp_path, "awq", algo="rtn", group_size=32) / "model.safetensors")
    got = awq.dequantize(*(t[f"{LAYER}.{k}"] for k in ("qweight", "qzeros", "scales")), 4, 32,
                         dtype=torch.float32)
    assert torch.equal(got, asym)
    t = load_file(_convert(src, tmp_path, "ct-w4a16", group_size=32, sym=False)
                  / "model.safetensors")
    got = ct.dequantize_packed(t[f"{LAYER}.weight_packed"], t[f"{LAYER}.weight_scale"].float(),
                               t[f"{LAYER}.weight_shape"], 4, t[f"{LAYER}.weight_zero_point"],
                               dtype=torch.float32)
    assert torch.equal(got, asym)


@pytest.mark.parametrize("method,kw,fixture", [
    ("gptq", dict(algo="rtn", sym=False), "gptq_v1_4bit_g128_asym_descact"),
    ("awq", dict(algo="rtn", group_size=64), "awq_gemm_g64"),
    ("ct-w4a16", dict(sym=False), "ct_w4a16_asym"),
    ("ct-w8a16", {}, "ct_w8a16_channel"),
    ("ct-fp8", {}, "ct_fp8_dynamic"),
    ("fp8", {}, "fp8_per_tensor"),
    ("bnb-nf4", dict(double_quant=True), "bnb_nf4_dq"),
    ("bnb-int8", {}, "bnb_int8"),
])
def test_layout_matches_the_reference_library(src, tmp_path, method, kw, fixture):
    """Same tensor names and dtypes per layer, same quantization_config keys and values
    (up to producer metadata) as the library-written fixture."""
    out = _convert(src, tmp_path, method, **kw)
    ours = load_file(out / "model.safetensors")
    theirs = load_file(FIXTURES / fixture / "model.safetensors")

    def layer(ts):
        return {k[len(LAYER) + 1:]: v.dtype for k, v in ts.items() if k.startswith(LAYER + ".")}

    assert layer(ours) == layer(theirs)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    ref = json.loads((FIXTURES / fixture / "config.json").read_text())["quantization_config"]
    assert set(ref) - {"meta"} <= set(qc)
    for key in ("quant_method", "bits", "sym", "version", "zero_point", "format",
                "checkpoint_format", "load_in_4bit", "bnb_4bit_quant_type", "weight_block_size"):
        if key in ref and key != "group_size":
            assert qc[key] == ref[key], key
    if "config_groups" in ref:
        w, rw = qc["config_groups"]["group_0"]["weights"], ref["config_groups"]["group_0"]["weights"]
        for key in ("num_bits", "strategy", "symmetric", "type", "zp_dtype"):
            assert w[key] == rw[key], key


def test_gguf_round_trip(src, ref_logits, tmp_path):
    out = tmp_path / "m.gguf"
    convert(str(src), out, ConvertRequest("gguf", gguf_type="Q8_0"), progress=False)
    lm = load(str(out), device="cpu", progress=False)
    assert lm.detected.settings["tensor_types"]["blk.0.attn_q.weight"] == "Q8_0"
    assert (prompt_logits(lm, IDS) - ref_logits).abs().max() / ref_logits.abs().max() < 0.03
    assert lm.tokenizer.encode("the cat") == load(str(src), device="cpu",
                                                  progress=False).tokenizer.encode("the cat")
    # GGUF -> dequantized safetensors: same weights as the GGUF holds, Q/K order restored
    # (compared through the GGUF's reference kernels: the CPU default rounds activations to int8)
    back = tmp_path / "back"
    convert(str(out), back, ConvertRequest("fp16", dtype="float32"), progress=False)
    exact = load(str(out), device="cpu", kernels="reference", progress=False)
    assert (prompt_logits(load(str(back), device="cpu", progress=False), IDS)
            - prompt_logits(exact, IDS)).abs().max() < 1e-4


@pytest.mark.parametrize("kw,err,needle", [
    (dict(method="awq", bits=3), UnsupportedError, "3-bit awq"),
    (dict(method="gptq", bits=5), UnsupportedError, "5-bit gptq"),
    (dict(method="gptq", act_order=True, algo="rtn"), ConfigError, "--act-order"),
    (dict(method="awq", sym=True), UnsupportedError, "zero points"),
    (dict(method="gguf", gguf_type="Q4_K"), UnsupportedError, "cannot quantize Q4_K"),
    (dict(method="gptq", calib="/nonexistent/calib.txt"), SourceError, "calibration text"),
    (dict(method="fp8", algo="gptq"), UnsupportedError, "integer target"),
])
def test_bad_requests(kw, err, needle):
    with pytest.raises(err) as exc:
        ConvertRequest(**kw)
    assert needle in str(exc.value)


def test_output_exists_and_shape_refusals(src, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        convert(str(src), tmp_path / "taken", ConvertRequest("gptq", algo="rtn"))
    # K = 64 is not a multiple of FP8_BLOCK's 128-wide activation groups: refused, nothing written
    with pytest.raises(UnsupportedError, match="multiple"):
        convert(str(src), tmp_path / "blk", ConvertRequest("ct-fp8-block"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_interrupted_conversion_leaves_nothing(src, tmp_path, monkeypatch):
    from quantrt.convert import writers_int

    calls = []

    def boom(self, name, w, iw=None):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return orig(self, name, w, iw)

    orig = writers_int.GPTQWriter.add_linear
    monkeypatch.setattr(writers_int.GPTQWriter, "add_linear", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(str(src), tmp_path / "out", ConvertRequest("gptq", algo="rtn"), progress=False)
    assert os.listdir(tmp_path) == []


def test_cli_convert_and_errors(src, tmp_path):
    from click.testing import CliRunner

    from quantrt.cli import main

    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), "--to", "awq",
                                  "--bits", "3"])
    assert r.exit_code == 2 and "Traceback" not in r.output and "3-bit awq" in r.output
    for flags in (["--awq-clip-qk"], ["--awq-scales", "--no-awq-clip-qk"]):
        r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), "--to", "gptq",
                                      *flags])
        assert r.exit_code == 2 and "to the AWQ algorithm" in r.output, r.output
        assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), "--to", "ct-w8a16",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert load(str(tmp_path / "o"), device="cpu", progress=False).detected.method == \
        "compressed-tensors"
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), "--to", "fp8"])
    assert r.exit_code == 2 and "already exists" in r.output
    assert isinstance(QuantrtError("x"), Exception)


@pytest.mark.parametrize("flags,scales,clip_qk", [
    ([], False, True),                                  # the default: clip search only
    (["--awq-scales", "--no-awq-clip-qk"], True, False),  # the published recipe
    (["--awq-scales"], True, True),
])
def test_cli_awq_switches_reach_the_request(src, tmp_path, monkeypatch, flags, scales, clip_qk):
    from click.testing import CliRunner

    import quantrt.convert
    from quantrt.cli import main

    seen = []
    monkeypatch.setattr(quantrt.convert, "convert",
                        lambda source, out, req, progress=None: seen.append(req) or str(out))
    for to in (["--to", "awq"], ["--to", "gptq", "--algo", "awq", "--asym"]):
        r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), *to, *flags])
        assert r.exit_code == 0, r.output
        assert (seen[-1].algo, seen[-1].awq_scales, seen[-1].awq_clip_qk) == \
            ("awq", scales, clip_qk)
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), "--to", "gptq"])
    assert r.exit_code == 0, r.output
    assert seen[-1].algo == "gptq"


def test_sharded_output_loads(src, ref_logits, tmp_path):
    out = tmp_path / "sharded"
    convert(str(src), out, ConvertRequest("gptq", algo="rtn", group_size=32,
                                          shard_bytes=64 << 10), progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    lm = load(str(out), device="cpu", progress=False)
    assert (prompt_logits(lm, IDS) - ref_logits).abs().max() / ref_logits.abs().max() < 0.2
