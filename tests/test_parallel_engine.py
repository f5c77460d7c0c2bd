"""The tensor-parallel engine end to end on the CPU (gloo, 2 processes): LLM.generate,
`quantrt run -tp 2`, and a worker that dies (a clear error, never a hang)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = [[1, 5, 9, 33, 100, 7], [3, 4, 200, 17, 18, 19, 20, 21, 22, 23, 24], [250], [8, 8, 8]]


@pytest.mark.parametrize("name", ["gptq_v1_4bit_g128_asym_descact", "bnb_nf4_dq"])
def test_llm_tp2_greedy_equals_tp1(name):
    from quantrt import LLM, SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    src = FIXTURES / name
    with LLM(src, kernels="reference", tensor_parallel_size=2, kv_cache_memory=1 << 22,
             block_size=4) as llm:
        tp2 = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp)]
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    one = LLM(src, kernels="reference", kv_cache_memory=1 << 22, block_size=4)
    assert tp2 == [o.outputs[0].token_ids for o in one.generate(PROMPTS, sp)]


def test_run_demo_tp2_says_paris():
    out = subprocess.run([sys.executable, "-m", "quantrt.cli", "run", "demo", "-p",
                          "The capital of France is", "--max-tokens", "4", "--temperature",
                          "0", "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(" Paris"), out.stdout


def test_dead_worker_ends_rank0_with_a_clear_error():
    script = textwrap.dedent(f"""
        import os, signal
        from quantrt import LLM, SamplingParams
        llm = LLM({str(FIXTURES / 'awq_gemm_g64')!r}, tensor_parallel_size=2,
                  kv_cache_memory=1 << 22)
        os.kill(llm.engine.executor.procs[0].pid, signal.SIGKILL)
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=50))
        print("generated after the worker died")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode != 0
    assert "generated after" not in out.stdout
    assert "tensor-parallel worker died: rank 1" in out.stderr, out.stderr[-2000:]
