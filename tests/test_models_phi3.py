"""Phi-3 against transformers on the same random-init weights (fp32).

Phi-3 checkpoints fuse q/k/v (``qkv_proj``) and gate/up (``gate_up_proj``); its longrope
scaling switches from the short to the long factors once a sequence's context exceeds
``original_max_position_embeddings`` (64 here), and it has a sliding window (9 here).

* safetensors, odd sizes (hidden 72, head_dim 18): prompt logits at lengths across the
  window and the longrope switch to ``TOL`` (measured <= 3.0e-7); greedy continuations identical; decoding across
  position 64 gives transformers' cached-generation logprobs (cached keys keep the rotation
  they were written with, new tokens rotate with the long factors) to ``TOL``;
* each feature changes the reference's output by far more than ``TOL``;
* GGUF Q8_0 / Q4_0 written like llama.cpp's converter (fused ``attn_qkv`` / ``ffn_up``,
  ``rope_factors_short/long.weight``, ``rope.scaling.attn_factor``) and 4-bit GPTQ / AWQ:
  reference kernels to ``TOL`` (measured <= 3.6e-7) with identical greedy tokens, default
  kernels to ``DEFAULT_KERNEL_TOL`` (measured <= 5.3e-3 on logits of magnitude <= 0.91).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.gguf_writer import convert_hf_to_gguf
from tests.tiny_models import (
    QUANT_FORMATS,
    check_cuda_engine,
    engine,
    hf_greedy,
    hf_logits,
    hf_model,
    make_tiny_model,
    our_greedy,
    our_logits,
    prompt,
    quantized,
    read_config,
    save_bpe_tokenizer,
)

TOL = 1e-4
DEFAULT_KERNEL_TOL = 3e-2
LENGTHS = [1, 8, 9, 10, 23, 64, 65, 100]  # window 9, original context 64
QSIZES = {"hidden_size": 96, "intermediate_size": 160}  # head_dim 24: GEMM K multiples of 32

_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="module", autouse=True)
def _module_setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: worker threads only spin
    yield
    torch.set_num_threads(threads)
    _BUILT.clear()


def _built(tmp_path_factory, kind: str):
    if kind not in _BUILT:
        root = tmp_path_factory.mktemp(f"phi3-{kind}")
        path = make_tiny_model(root / "phi3", "phi3", seed=31, **(QSIZES if kind == "quant" else {}))
        save_bpe_tokenizer(path)  # merges: a gpt2 GGUF vocabulary needs some
        _BUILT[kind] = (path, engine(path), hf_model(path))
    return _BUILT[kind]


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return _built(tmp_path_factory, "odd")


def test_logits_match_transformers(odd):
    _, eng, hf = odd
    for length in LENGTHS:
        ids = prompt(length)
        assert (our_logits(eng, ids) - hf_logits(hf, ids)).abs().max().item() < TOL, length


def test_greedy_matches_transformers(odd):
    _, eng, hf = odd
    ids = prompt(9, seed=1)
    assert our_greedy(eng, ids, 16) == hf_greedy(hf, ids, 16)


def test_decoding_across_the_longrope_switch_matches_cached_generation(odd):
    from quantrt.engine.sequence import SamplingParams

    _, eng, hf = odd
    ids = prompt(60, seed=2)
    seq = eng.generate([ids], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                             logprobs=0))[0]
    past, step, want_tokens, want_lp = None, torch.tensor([ids]), [], []
    with torch.no_grad():
        for _ in range(10):
            out = hf(step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = out.logits[0, -1].float().log_softmax(-1)
            nxt = int(logp.argmax())
            want_tokens.append(nxt)
            want_lp.append(float(logp[nxt]))
            step = torch.tensor([[nxt]])
    assert list(seq.output_ids) == want_tokens
    got_lp = [lp.logprob for lp in seq.logprobs]
    assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < TOL
    # recomputing the whole sequence with long factors gives other numbers past position 64
    full = hf_logits(hf, ids + want_tokens)[-1].log_softmax(-1)
    assert abs(float(full[want_tokens[-1]]) - want_lp[-1]) > 10 * TOL


def test_every_feature_changes_the_reference(odd, tmp_path):
    path, _, hf = odd
    cfg = read_config(path)
    ids = prompt(100)
    ref = hf_logits(hf, ids)
    rope = cfg["rope_parameters"]
    for change in ({"sliding_window": None},
                   {"rope_parameters": {**rope, "long_factor": rope["short_factor"]}},
                   {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}):
        out = tmp_path / "variant"
        shutil.copytree(path, out)
        (out / "config.json").write_text(json.dumps({**cfg, **change}))
        assert (hf_logits(hf_model(out), ids) - ref).abs().max().item() > 10 * TOL, change
        shutil.rmtree(out)


_QUANT: dict[str, tuple] = {}


def _quant(tmp_path_factory, fmt: str):
    if fmt not in _QUANT:
        path, _, _ = _built(tmp_path_factory, "quant")
        source, state = quantized(path, fmt)
        _QUANT[fmt] = (source, hf_model(path, state))
    return _QUANT[fmt]


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_quantized_reference_kernels_match_transformers(tmp_path_factory, fmt):
    source, hf = _quant(tmp_path_factory, fmt)
    eng = engine(source, kernels="reference")
    for length in (1, 23, 100):
        ids = prompt(length, seed=3)
        assert (our_logits(eng, ids) - hf_logits(hf, ids)).abs().max().item() < TOL, length
    ids = prompt(9, seed=4)
    assert our_greedy(eng, ids, 12) == hf_greedy(hf, ids, 12)


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_quantized_default_kernels_close_to_transformers(tmp_path_factory, fmt):
    source, hf = _quant(tmp_path_factory, fmt)
    eng = engine(source)
    for length in (1, 23):
        ids = prompt(length, seed=5)
        assert (our_logits(eng, ids) - hf_logits(hf, ids)).abs().max().item() < DEFAULT_KERNEL_TOL


def test_f32_gguf_equals_safetensors(tmp_path_factory):
    path, st, _ = _built(tmp_path_factory, "quant")
    g = engine(convert_hf_to_gguf(path, path / "tiny-F32.gguf", "F32"))
    ids = prompt(100, seed=6)  # past the original context: the long factors, from tensors
    assert (our_logits(g, ids) - our_logits(st, ids)).abs().max().item() < 1e-5


def test_gguf_follows_llama_cpp_conventions(tmp_path_factory):
    from formats.gguf_file import read_gguf
    from quantrt.loader import load

    path, _, _ = _built(tmp_path_factory, "quant")
    source, _ = _quant(tmp_path_factory, "Q8_0")
    cfg, gf = read_config(path), read_gguf(source)
    meta = gf.metadata
    assert meta["general.architecture"] == "phi3" and "blk.0.attn_q.weight" not in gf.tensors
    assert tuple(gf.tensors["blk.0.attn_qkv.weight"].shape) == (96 + 2 * 48, 96)
    assert tuple(gf.tensors["blk.0.ffn_up.weight"].shape) == (2 * 160, 96)
    assert meta["phi3.rope.scaling.original_context_length"] == 64
    assert meta["phi3.attention.sliding_window"] == 9 and meta["phi3.rope.dimension_count"] == 24
    assert gf.tensor("rope_factors_long.weight").float().tolist() == pytest.approx(
        cfg["rope_parameters"]["long_factor"])
    c = load(source, device="cpu", progress=False).config
    assert c.rope.rope_type == "longrope" and c.rope.original_max_position == 64
    assert c.rope.short_factor == pytest.approx(cfg["rope_parameters"]["short_factor"])
    # transformers' default attention factor for factor = 256 / 64
    assert c.rope.attention_factor == pytest.approx((1 + torch.log(torch.tensor(4.0)).item()
                                                     / torch.log(torch.tensor(64.0)).item()) ** 0.5)
    assert c.sliding_window == 9 and c.layer_types == ()


def test_inspect_shows_longrope_and_window(odd):
    from quantrt.inspect_report import build_report, format_report
    from quantrt.loader import load

    path, _, _ = odd
    text = format_report(build_report(load(path, device="cpu", progress=False)))
    assert "rope theta 10000 (longrope x4, original context 64)" in text
    assert "sliding window 9 on 2 of 2 layers" in text
    assert "qkv_proj" in text and "gate_up_proj" in text


@pytest.mark.gpu
def test_cuda_engine_matches_transformers(odd):
    """Decode steps (CUDA graphs) pick the longrope table from positions alone."""
    path, _, hf = odd
    check_cuda_engine(path, hf, (9, 58, 70))


def test_transformers_4_phi3_config_parses_like_5():
    from quantrt.config import from_hf_config

    path_cfg = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 96, "intermediate_size": 160,
                "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
                "max_position_embeddings": 256, "original_max_position_embeddings": 64,
                "rope_theta": 10000.0, "sliding_window": 9}
    factors = {"short_factor": [1.0] * 12, "long_factor": [2.0] * 12}
    old = from_hf_config({**path_cfg, "rope_scaling": {"type": "su", **factors}})
    new = from_hf_config({**path_cfg, "rope_parameters": {"rope_type": "longrope", **factors,
                                                          "partial_rotary_factor": 1.0}})
    assert old == new and old.rope.rope_type == "longrope" and old.rope.factor == 4.0
    yarn = from_hf_config({**path_cfg, "rope_scaling": {"type": "yarn", **factors}})
    assert yarn.rope == old.rope  # Phi-3's "yarn" with short/long factors is longrope
    with pytest.raises(Exception, match="longrope factors have 3 entries"):
        from_hf_config({**path_cfg, "rope_scaling": {"type": "longrope", "short_factor": [1] * 3,
                                                     "long_factor": [1] * 3}})
