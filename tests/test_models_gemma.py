"""Gemma 2 and Gemma 3 (text) against transformers on the same random-init weights (fp32).

* safetensors checkpoints (measured <= 4.3e-7) with odd sizes (hidden 72, head_dim 32 != hidden / heads, query
  scale from query_pre_attn_scalar=20, a window of 6 tokens; Gemma 3: two sliding layers
  with their own rope base then a global one with linear rope scaling; Gemma 2: alternating
  layers, attention and final soft-caps small enough to bend these models' scores): prompt
  logits at lengths across the window to ``TOL``, greedy continuations (crossing the window
  while decoding) identical;
* every one of those features changes the reference's output by far more than ``TOL`` at
  these lengths (so a model that ignored one would fail);
* the same architectures at GGUF-able sizes as GGUF Q8_0 / Q4_0 written the way llama.cpp's
  converter writes them (norm +1, no output.weight, Gemma 3's trimmed vocabulary) and as
  4-bit GPTQ / AWQ checkpoints: with ``kernels="reference"`` logits agree with transformers
  holding the dequantized weights to ``TOL`` (measured <= 1.0e-6) and greedy tokens are
  identical; with the default kernels (CPU: tinygemm int4 with bf16 activations for prompts
  of <= 32 rows) to ``DEFAULT_KERNEL_TOL`` (measured <= 1.5e-2 on logits of magnitude <= 0.9);
* GGUF metadata conventions, BOS from GGUF metadata, inspect, and the Triton decode kernel's
  soft-cap against the torch reference.
"""
from __future__ import annotations

import json
import os
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

ARCHS = ["gemma2", "gemma3"]
TOL = 1e-4
DEFAULT_KERNEL_TOL = 3e-2
LENGTHS = [1, 5, 6, 7, 13, 23]  # window 6
GREEDY = 16
# GGUF-able: every GEMM K a multiple of 32; the query scale llama.cpp assumes (head_dim);
# Gemma 3 with the layer pattern llama.cpp assumes (every 6th layer global).
QSIZES = {"hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 4,
              "num_key_value_heads": 2, "query_pre_attn_scalar": 32}
QEXTRA = {"gemma2": {}, "gemma3": {"num_hidden_layers": 6, "sliding_window_pattern": 6}}

_BUILT: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="module", autouse=True)
def _module_setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: worker threads only spin
    yield
    torch.set_num_threads(threads)
    _BUILT.clear()


def _built(tmp_path_factory, arch: str, kind: str):
    """(checkpoint dir, engine or None, HF reference), built once per module."""
    key = (arch, kind)
    if key not in _BUILT:
        root = tmp_path_factory.mktemp(f"{arch}-{kind}")
        if kind == "odd":
            path = make_tiny_model(root / arch, arch, seed=21)
        else:
            path = make_tiny_model(root / arch, arch, seed=22, **QSIZES, **QEXTRA[arch])
        save_bpe_tokenizer(path, add_bos=True)
        _BUILT[key] = (path, engine(path) if kind == "odd" else None, hf_model(path))
    return _BUILT[key]


@pytest.fixture(scope="module", params=ARCHS)
def odd(request, tmp_path_factory):
    return _built(tmp_path_factory, request.param, "odd")


# -- safetensors, odd sizes -------------------------------------------------------------------
def test_logits_match_transformers(odd):
    _path, eng, hf = odd
    for length in LENGTHS:
        ids = prompt(length)
        assert (our_logits(eng, ids) - hf_logits(hf, ids)).abs().max().item() < TOL, length


def test_greedy_matches_transformers(odd):
    _path, eng, hf = odd
    ids = prompt(9, seed=1)
    assert our_greedy(eng, ids, GREEDY) == hf_greedy(hf, ids, GREEDY)
    assert eng.blocks.num_free == eng.blocks.num_blocks


def _variant(path, tmp_path, **changes):
    """transformers' model of ``path`` with config keys changed (same weights)."""
    out = tmp_path / "variant"
    shutil.copytree(path, out)
    cfg = {**read_config(path), **changes}
    (out / "config.json").write_text(json.dumps(cfg))
    return hf_model(out)


def test_every_feature_changes_the_reference(odd, tmp_path):
    path, _, hf = odd
    cfg = read_config(path)
    ids = prompt(23)
    ref = hf_logits(hf, ids)
    changes = [{"sliding_window": 1000}, {"query_pre_attn_scalar": cfg["head_dim"]}]
    if cfg["architectures"] == ["Gemma2ForCausalLM"]:
        changes += [{"attn_logit_softcapping": None}, {"final_logit_softcapping": None}]
    else:
        rope = cfg["rope_parameters"]
        changes += [{"rope_parameters": {**rope, "sliding_attention": rope["full_attention"]}},
                    {"rope_parameters": {**rope, "full_attention": rope["sliding_attention"]}}]
    for change in changes:
        other = hf_logits(_variant(path, tmp_path, **change), ids)
        shutil.rmtree(tmp_path / "variant")
        assert (other - ref).abs().max().item() > 10 * TOL, change


# -- quantized: GGUF (llama.cpp's conventions) and GPTQ / AWQ ----------------------------------
Q_CASES = [pytest.param(a, f, id=f"{a}-{f}") for a in ARCHS for f in QUANT_FORMATS]
_QUANT: dict[tuple[str, str], object] = {}


def _quant(tmp_path_factory, arch: str, fmt: str):
    if (arch, fmt) not in _QUANT:
        path, _, _ = _built(tmp_path_factory, arch, "quant")
        source, state = quantized(path, fmt)
        _QUANT[arch, fmt] = (source, hf_model(path, state))
    return _QUANT[arch, fmt]


@pytest.mark.parametrize("arch, fmt", Q_CASES)
def test_quantized_reference_kernels_match_transformers(tmp_path_factory, arch, fmt):
    source, hf = _quant(tmp_path_factory, arch, fmt)
    eng = engine(source, kernels="reference")
    vocab = eng.lm.config.vocab_size  # Gemma 3 GGUFs keep only the tokenizer's rows
    for length in (1, 7, 23):
        ids = prompt(length, seed=2)
        ours, ref = our_logits(eng, ids), hf_logits(hf, ids, vocab)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < TOL, length
    ids = prompt(9, seed=3)
    assert our_greedy(eng, ids, 12) == hf_greedy(hf, ids, 12, vocab)


@pytest.mark.parametrize("arch, fmt", Q_CASES)
def test_quantized_default_kernels_close_to_transformers(tmp_path_factory, arch, fmt):
    source, hf = _quant(tmp_path_factory, arch, fmt)
    eng = engine(source)
    for length in (1, 23):
        ids = prompt(length, seed=4)
        ours = our_logits(eng, ids)
        assert (ours - hf_logits(hf, ids, ours.shape[1])).abs().max().item() < DEFAULT_KERNEL_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_equals_safetensors(tmp_path_factory, arch):
    path, _, _ = _built(tmp_path_factory, arch, "quant")
    g = convert_hf_to_gguf(path, path / "tiny-F32.gguf", "F32")
    a, b = engine(g), engine(path)
    ids = prompt(23, seed=5)
    la = our_logits(a, ids)
    assert (la - our_logits(b, ids)[:, :la.shape[1]]).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_follows_llama_cpp_conventions(tmp_path_factory, arch):
    from safetensors.torch import load_file

    from formats.gguf_file import read_gguf
    from quantrt.loader import load

    path, _, _ = _built(tmp_path_factory, arch, "quant")
    source, _ = _quant(tmp_path_factory, arch, "Q8_0")
    cfg, gf = read_config(path), read_gguf(source)
    meta = gf.metadata
    assert meta["general.architecture"] == arch and "output.weight" not in gf.tensors
    assert meta[f"{arch}.attention.sliding_window"] == 6
    assert meta[f"{arch}.attention.key_length"] == 32 and "tokenizer.ggml.add_bos_token" in meta
    hf_norm = load_file(str(path / "model.safetensors"))["model.layers.0.input_layernorm.weight"]
    assert torch.allclose(gf.tensor("blk.0.attn_norm.weight").float(), hf_norm + 1)
    lm = load(source, device="cpu", progress=False)
    c = lm.config
    assert c.tie_word_embeddings and c.norm_offset == 0.0 and c.hidden_act == "gelu_tanh"
    assert c.attn_scale == pytest.approx(32 ** -0.5) and c.embed_scale == pytest.approx(96 ** 0.5)
    if arch == "gemma2":
        assert (c.attn_softcap, c.final_softcap) == pytest.approx((0.05, 1.0))  # stored as f32
        assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
        assert c.vocab_size == 300
    else:
        assert c.attn_softcap is None and c.final_softcap is None
        assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
        assert (c.rope.theta, c.rope.rope_type, c.rope.factor) == (50000.0, "linear", 2.0)
        assert c.local_rope.theta == 1000.0 and c.local_rope.rope_type == "default"
        assert c.vocab_size == len(meta["tokenizer.ggml.tokens"]) == 265 < cfg["vocab_size"]


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_tokenizer_adds_bos_like_transformers(tmp_path_factory, arch):
    from quantrt.loader import load

    path, _, _ = _built(tmp_path_factory, arch, "quant")
    source, _ = _quant(tmp_path_factory, arch, "Q8_0")
    ours = load(source, device="cpu", progress=False).tokenizer
    ref = load(path, device="cpu", progress=False).tokenizer
    for text in ["in the winter", "", "hé <s>"]:
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode(text)[:1] == [256]


def test_converter_refuses_what_llama_cpp_would_run_differently(tmp_path):
    path = make_tiny_model(tmp_path / "g", "gemma3", **QSIZES, num_hidden_layers=6,
                           sliding_window_pattern=3)
    with pytest.raises(ValueError, match="every 6th layer"):
        convert_hf_to_gguf(path, tmp_path / "x.gguf", "F32")
    path = make_tiny_model(tmp_path / "h", "gemma2", **{**QSIZES, "query_pre_attn_scalar": 20})
    with pytest.raises(ValueError, match="1/sqrt"):
        convert_hf_to_gguf(path, tmp_path / "y.gguf", "F32")


def test_inspect_shows_architecture_settings(odd):
    from quantrt.inspect_report import build_report, format_report
    from quantrt.loader import load

    path, _, _ = odd
    report = build_report(load(path, device="cpu", progress=False))
    c, text = report["config"], format_report(report)
    assert c["sliding_window"] == 6 and "sliding window 6" in text
    assert "query scale 1/sqrt(20)" in text and "activation gelu_tanh" in text
    if c["architecture"] == "Gemma2ForCausalLM":
        assert (c["attn_softcap"], c["final_softcap"]) == (0.05, 1.0)
        assert "softcap attention 0.05, logits 1" in text and "on 2 of 3 layers" in text
    else:
        assert c["rope_local_theta"] == 1000.0 and "local rope theta 1000" in text
        assert "linear x2" in text and "on 2 of 3 layers" in text


def test_gemma3_multimodal_checkpoint_runs_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration (the 4B+ checkpoints): the text model's tensors under
    language_model.*, a vision tower and projector that a text model skips."""
    import transformers

    from tests.tiny_models import ARCHS, VOCAB

    torch.manual_seed(23)
    text = {**ARCHS["gemma3"][2], "vocab_size": VOCAB, "hidden_size": 72, "intermediate_size": 136,
            "num_attention_heads": 3, "num_key_value_heads": 1, "max_position_embeddings": 256,
            "bos_token_id": 256, "eos_token_id": 257}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=299, boi_token_index=298,
                                    eoi_token_index=297)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "mm")
    save_bpe_tokenizer(tmp_path / "mm", add_bos=True)
    eng = engine(tmp_path / "mm")
    assert eng.lm.config.architecture == "Gemma3ForConditionalGeneration"
    assert eng.lm.config.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    for length in (1, 7, 23):
        ids = prompt(length, seed=8)
        assert (our_logits(eng, ids) - hf_logits(hf, ids)).abs().max().item() < TOL


# -- config and metadata conventions ------------------------------------------------------------
def test_gemma3_transformers_4_layout_parses_like_5():
    import transformers

    from quantrt.config import from_hf_config

    common = {"vocab_size": 300, "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 7,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                  "query_pre_attn_scalar": 32, "sliding_window": 8, "max_position_embeddings": 4096,
                  "bos_token_id": 2, "eos_token_id": 1}
    new = transformers.Gemma3TextConfig(**common, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}).to_dict()
    new["architectures"] = ["Gemma3ForCausalLM"]
    old = {**common, "architectures": ["Gemma3ForCausalLM"], "rope_theta": 1e6,
           "rope_local_base_freq": 1e4, "sliding_window_pattern": 6,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    a, b = from_hf_config(new), from_hf_config(old)
    assert a == b
    assert a.layer_types == ("sliding_attention",) * 5 + ("full_attention",) * 1 + ("sliding_attention",)
    assert a.window(5) is None and a.window(6) == 8 and a.rope_for(0).theta == 1e4
    # a config leaving keys out gets transformers' Gemma defaults
    bare = from_hf_config({k: v for k, v in old.items() if k not in (
        "query_pre_attn_scalar", "sliding_window_pattern", "rope_theta")})
    assert bare.attn_scale == 256 ** -0.5 and bare.rope.theta == 1e6
    assert bare.layer_types == a.layer_types


def _meta(arch: str, layers: int, **extra) -> dict:
    return {"general.architecture": arch, f"{arch}.block_count": layers,
            f"{arch}.embedding_length": 96, f"{arch}.feed_forward_length": 160,
            f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
            f"{arch}.attention.key_length": 32, f"{arch}.attention.sliding_window": 8,
            "tokenizer.ggml.tokens": ["a"] * 50, **{f"{arch}.{k}": v for k, v in extra.items()}}


def test_gguf_metadata_defaults_are_llama_cpps():
    from quantrt.config import from_gguf_metadata

    g3 = from_gguf_metadata(_meta("gemma3", 7, **{"rope.freq_base": 1e6}), "m.gguf")
    assert g3.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert g3.local_rope.theta == 10000.0 and g3.rope.theta == 1e6  # llama.cpp's fixed local base
    assert g3.attn_scale == 32 ** -0.5 and g3.rope_for(5) is g3.rope
    assert from_gguf_metadata(_meta("gemma3", 62), "m.gguf").attn_scale == (96 // 4) ** -0.5
    assert from_gguf_metadata(_meta("gemma2", 46), "m.gguf").attn_scale == (96 // 4) ** -0.5
    g2 = from_gguf_metadata(_meta("gemma2", 4), "m.gguf")
    assert g2.layer_types == ("sliding_attention", "full_attention") * 2
    pattern = [True, False, False]
    explicit = from_gguf_metadata(_meta("gemma3", 3, **{
        "attention.sliding_window_pattern": pattern, "attention.scale": 0.125}), "m.gguf")
    assert explicit.layer_types == ("sliding_attention", "full_attention", "full_attention")
    assert explicit.attn_scale == 0.125
    assert from_gguf_metadata(_meta("gemma3", 4, **{"attention.sliding_window_pattern": 2}),
                              "m.gguf").layer_types[1] == "full_attention"


# -- the Triton decode kernel's soft-cap --------------------------------------------------------
def _kernel_case(device: str, dtype: torch.dtype):
    from quant_kernels.paged_attention import paged_decode_attention
    from quantrt.models.attention import AttentionMetadata, paged_attention_ref

    g = torch.Generator().manual_seed(7)
    ctx, heads, kv_heads, d, bs = [5, 33, 17], 6, 2, 24, 8
    k = torch.randn(16, bs, kv_heads, d, generator=g)
    v = torch.randn(16, bs, kv_heads, d, generator=g)
    tables = torch.randperm(16, generator=g)[:15].reshape(3, 5).int()
    q = torch.randn(3, heads, d, generator=g)
    meta = AttentionMetadata(torch.zeros(3, dtype=torch.int64), tables,
                             torch.tensor(ctx, dtype=torch.int32),
                             torch.arange(4, dtype=torch.int32), ctx, [1, 1, 1])
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    for window, cap in [(None, 0.7), (9, 2.0)]:
        want = paged_attention_ref(q, k, v, meta, d ** -0.5, window, cap)
        assert (want - paged_attention_ref(q, k, v, meta, d ** -0.5, window)).abs().max() > 0.1
        got = paged_decode_attention(*(t.to(device, dtype) for t in (q, k, v)), tables.to(device),
                                     meta.context_lens.to(device), d ** -0.5, window, 2,
                                     softcap=cap)
        assert (got.float().cpu() - want).abs().max().item() < tol


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_softcap_decode_kernel_interpreted():
    _kernel_case("cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_softcap_decode_kernel_gpu(dtype):
    _kernel_case("cuda", dtype)


@pytest.mark.gpu
def test_cuda_engine_matches_transformers(odd):
    """Soft-capped and per-layer-windowed decode steps in the Triton kernel, under CUDA graphs."""
    path, _, hf = odd
    check_cuda_engine(path, hf, (4, 11, 23))
