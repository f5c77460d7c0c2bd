"""Mistral's sliding-window attention in the engine, against transformers (fp32, CPU).

The window (6 tokens) is shorter than the prompts, not a multiple of the KV block size (4),
and is crossed while prefilling (whole or in chunks), while decoding, and in steps that mix
sequences of different lengths.  Logits agree to ``TOL`` (measured <= 2.1e-7); greedy tokens are identical.
The KV cache keeps every token (the window only masks attention), so accounting is unchanged.
"""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import (
    check_cuda_engine,
    engine,
    hf_greedy,
    hf_logits,
    hf_model,
    make_tiny_model,
    our_greedy,
    our_logits,
    prompt,
)

TOL = 1e-4
LENGTHS = [1, 5, 6, 7, 11, 23]


@pytest.fixture(scope="module")
def swa(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: worker threads only spin
    path = make_tiny_model(tmp_path_factory.mktemp("mistral") / "m", "mistral-swa", seed=41)
    yield path, engine(path), hf_model(path)
    torch.set_num_threads(threads)


def test_window_is_read_and_applies_to_every_layer(swa):
    _, eng, _ = swa
    cfg = eng.lm.config
    assert cfg.sliding_window == 6 and [cfg.window(i) for i in range(cfg.num_layers)] == [6, 6]


def test_prompt_logits_across_the_window(swa):
    _, eng, hf = swa
    for length in LENGTHS:
        ids = prompt(length)
        assert (our_logits(eng, ids) - hf_logits(hf, ids)).abs().max().item() < TOL, length


def test_the_window_changes_the_reference(swa, tmp_path):
    import json
    import shutil

    path, _, hf = swa
    out = tmp_path / "nowindow"
    shutil.copytree(path, out)
    cfg = json.loads((path / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}))
    ids = prompt(23)
    assert (hf_logits(hf_model(out), ids) - hf_logits(hf, ids)).abs().max().item() > 10 * TOL


def test_greedy_decoding_across_the_window(swa):
    _, eng, hf = swa
    ids = prompt(4, seed=1)  # 4 prompt tokens, 16 decoded: the window is crossed while decoding
    assert our_greedy(eng, ids, 16) == hf_greedy(hf, ids, 16)
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_chunked_prefill_and_mixed_batches(swa):
    """Prompts prefilled 5 tokens per step (chunk queries see the window over cached keys),
    several at once next to decoding sequences: each result equals transformers'."""
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.engine.sequence import SamplingParams

    _, eng, hf = swa
    small = LLMEngine(eng.lm, EngineConfig(kv_cache_memory=8 << 20, block_size=4,
                                           max_num_batched_tokens=5, enable_prefix_caching=False))
    prompts = [prompt(n, seed=2) for n in (3, 17, 9)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    got = [list(s.output_ids) for s in small.generate(prompts, params)]
    assert got == [hf_greedy(hf, p, 8) for p in prompts]


@pytest.mark.gpu
def test_cuda_engine_matches_transformers(swa):
    path, _, hf = swa
    check_cuda_engine(path, hf, (3, 11, 23))


def test_gguf_and_qwen2_window_settings():
    from quantrt.config import from_gguf_metadata, from_hf_config

    meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
            "tokenizer.ggml.tokens": ["a"] * 50}
    # llama.cpp writes no window for Mistral (arch llama); a file that has one is honoured
    assert from_gguf_metadata(meta, "m.gguf").sliding_window is None
    with_window = from_gguf_metadata({**meta, "llama.attention.sliding_window": 4096}, "m.gguf")
    assert with_window.window(0) == with_window.window(1) == 4096
    qwen = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 50,
            "sliding_window": 32, "use_sliding_window": True, "max_window_layers": 2}
    cfg = from_hf_config(qwen)
    assert [cfg.window(i) for i in range(4)] == [None, None, 32, 32]  # transformers' rule
    assert from_hf_config({**qwen, "use_sliding_window": False}).window(3) is None
