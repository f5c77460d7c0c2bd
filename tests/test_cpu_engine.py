"""The CPU fast path end to end on a tiny quantized GGUF: batch invariance through the
engine, the kernel choice ``inspect`` reports, and the fallback when the extension is
refused (each refusal a one-line reason)."""
from __future__ import annotations

import pytest
import torch

from quant_kernels import cpu_ext
from quantrt.engine.sequence import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.gguf_writer import convert_hf_to_gguf
    from tests.test_gguf_models import save_bpe_tokenizer
    from tests.tiny_models import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("cpu"), "llama", seed=21, hidden_size=96,
                           intermediate_size=160)
    save_bpe_tokenizer(path)
    return {qt: convert_hf_to_gguf(path, path / f"tiny-{qt}.gguf", qt) for qt in ("Q4_1", "Q5_0")}


def _engine(lm, **kw):
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine

    kw.setdefault("kv_cache_memory", 4 << 20)
    kw.setdefault("block_size", 4)
    return LLMEngine(lm, EngineConfig(**kw))


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.skipif(not cpu_ext.available(), reason=f"CPU extension: {cpu_ext.status()[1]}")
@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_0"])
def test_batched_generation_equals_alone(tiny_gguf, qtype):
    """Issue 5's acceptance on the quantized CPU path: 16 mixed-length prompts batched (with
    chunked prefill mixed into decode steps) give each prompt's tokens generated alone."""
    from quantrt.loader import load

    lm = load(tiny_gguf[qtype], device="cpu", progress=False)
    assert lm.model.layers[0].mlp.down_proj.kernel_choice.name.startswith("cpu-ggml")
    prompts = _prompts(16, seed=4)
    alone = [_engine(lm).generate([p], GREEDY)[0].output_ids for p in prompts]
    eng = _engine(lm, max_num_batched_tokens=40)
    batched = [s.output_ids for s in eng.generate(prompts, GREEDY)]
    assert batched == alone
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_refused_extension_falls_back_with_reason(tiny_gguf, monkeypatch):
    from quantrt.loader import load

    monkeypatch.setattr(cpu_ext, "_state", (False, "the CPU lacks AVX2"))
    monkeypatch.setattr("quant_kernels.cpu_layers._ops", None)
    lm = load(tiny_gguf["Q4_1"], device="cpu", progress=False)
    choice = lm.model.layers[0].self_attn.qkv_proj.kernel_choice
    assert choice.name.startswith("cpu-int4pack")
    assert ("cpu-ggml (AVX2 int8-dot over GGML blocks)", "the CPU lacks AVX2") in choice.refused
    assert "the CPU lacks AVX2" in choice.describe()
    out = _engine(lm).generate([[1, 2, 3]], GREEDY)[0].output_ids
    assert len(out) == 12


@pytest.mark.parametrize("env,match", [
    ({"QUANTRT_CPU_EXT": "0"}, "disabled by QUANTRT_CPU_EXT=0"),
    ({"CXX": "/nonexistent/c++"}, r"no C\+\+ compiler \(/nonexistent/c\+\+\)"),
])
def test_status_reasons(monkeypatch, env, match):
    import re

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ok, why = cpu_ext._load()
    assert not ok and re.search(match, why), why


def test_failed_build_is_a_reason_with_the_log(monkeypatch, tmp_path):
    if cpu_ext._compiler() is None or not cpu_ext.available():
        pytest.skip("needs a compiler and an AVX2 CPU")
    src = tmp_path / "csrc"
    src.mkdir()
    for name in cpu_ext.SOURCES + cpu_ext.HEADERS:
        (src / name).write_text("this is not C++;\n")
    monkeypatch.setattr(cpu_ext, "CSRC", src)
    monkeypatch.setenv("QUANTRT_CACHE", str(tmp_path / "cache"))
    ok, why = cpu_ext._load()
    assert not ok and why.startswith("building the CPU kernels failed: compiling failed (log: ")
    log = why.split("(log: ")[1].rstrip(")")
    assert "error" in open(log).read()
