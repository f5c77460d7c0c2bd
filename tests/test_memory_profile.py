"""KV-cache sizing from gpu_memory_utilization (quantrt/engine/memory_profile.py): the
budget arithmetic, the profiling steps' inputs, and the engine options around it.  The
profiling itself runs on CUDA (tests/test_engine_gpu.py)."""
from __future__ import annotations

import pytest

from quantrt.engine.memory_profile import (SLACK_BYTES, MemoryProfile, profile_inputs,
                                           split_lengths)
from quantrt.errors import ConfigError

GIB = 1 << 30


@pytest.mark.parametrize("tokens,seqs,max_len", [(1, 1, 8), (17, 4, 100), (23, 23, 1),
                                                (8192, 256, 4096), (5, 64, 2), (2048, 4, 256),
                                                (2048, 3, 17)])
def test_split_lengths_is_a_step_the_scheduler_can_build(tokens, seqs, max_len):
    lens = split_lengths(tokens, seqs, max_len)
    assert sum(lens) == min(tokens, seqs * max_len)
    assert len(lens) == min(seqs, tokens)
    assert max(lens) - min(lens) <= 1 and min(lens) >= 1 and max(lens) <= max_len


@pytest.mark.parametrize("lengths,block_size", [([1], 16), ([17, 1, 23], 4), ([5] * 7, 16)])
def test_profile_inputs_are_fresh_prompts_in_their_own_blocks(lengths, block_size):
    inp, blocks = profile_inputs(lengths, block_size, vocab=97)
    assert blocks == sum(-(-n // block_size) for n in lengths)
    assert len(inp.ids) == len(inp.pos) == len(inp.slots) == sum(lengths)
    assert all(0 <= t < 97 for t in inp.ids)
    assert inp.ctx == inp.qlens == lengths
    assert inp.decode_only == all(n == 1 for n in lengths)
    start = 0
    for n, table, row in zip(lengths, inp.tables, inp.rows):
        assert row == start + n - 1
        assert inp.pos[start:start + n] == list(range(n))
        # each token's slot is in its own sequence's blocks, in order
        slots = inp.slots[start:start + n]
        assert slots == [table[p // block_size] * block_size + p % block_size for p in range(n)]
        start += n
    assert len(set(inp.slots)) == len(inp.slots)


def test_budget_is_what_utilization_leaves():
    prof = MemoryProfile(total=80 * GIB, in_use=6 * GIB, prefill_peak=2 * GIB,
                         decode_peak=GIB // 2)
    assert prof.kv_budget(0.9) == int(0.9 * 80 * GIB) - 6 * GIB - 2 * GIB - GIB // 2 \
        - SLACK_BYTES
    assert prof.kv_budget(0.5) < prof.kv_budget(0.9)
    text = prof.explain(0.9)
    assert "80.00 GiB" in text and "6.00 GiB" in text and "2.00 GiB" in text


@pytest.mark.parametrize("kwargs,match", [
    ({"gpu_memory_utilization": 0}, r"\(0, 1\]"),
    ({"gpu_memory_utilization": 1.5}, r"\(0, 1\]"),
    ({"gpu_memory_utilization": True}, r"\(0, 1\]"),
    ({"gpu_memory_utilization": "0.9"}, r"\(0, 1\]"),
    ({"gpu_memory_utilization": 0.5, "kv_cache_memory": GIB}, "not both"),
])
def test_bad_utilization(kwargs, match):
    from quantrt.engine.llm_engine import EngineConfig

    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kwargs)


def test_cpu_engine_sizes_without_profiling(tmp_path):
    """On the CPU the default stays 1 GiB; a utilization is refused with a hint."""
    from quantrt.engine.llm_engine import DEFAULT_CPU_KV_BYTES, EngineConfig, kv_memory
    from quantrt.loader import load
    from tests.tiny_models import make_tiny_model

    lm = load(str(make_tiny_model(tmp_path / "m", seed=1)), device="cpu", dtype="float32")
    budget, per_token = kv_memory(lm, EngineConfig())
    assert budget == DEFAULT_CPU_KV_BYTES and per_token > 0
    assert kv_memory(lm, EngineConfig(kv_cache_memory=12345))[0] == 12345
    with pytest.raises(ConfigError, match="CUDA device") as err:
        kv_memory(lm, EngineConfig(gpu_memory_utilization=0.5))
    assert "kv_cache_memory" in str(err.value.hint)
