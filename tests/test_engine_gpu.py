"""The engine on the GPU: decode steps replayed from CUDA graphs (Triton paged decode
attention, padded batch buckets) give the same greedy tokens as eager steps, for an fp32
unquantized model and for an AWQ fixture on the fused int4 kernel; no KV block leaks."""
from __future__ import annotations

import pytest

from tests.fixture_util import FIXTURES
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 17, 99, 3], list(range(40, 63)), [200], list(range(1, 18)), [7] * 9]


def _run(source, graphs: bool, dtype):
    from quantrt import LLM, SamplingParams

    llm = LLM(str(source), device="cuda", dtype=dtype, cuda_graphs=graphs, max_num_seqs=8,
              block_size=4)
    assert (llm.engine.runner.graphs is not None) == graphs
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = llm.generate(PROMPTS, sp)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("kind", ["fp32-tiny", "awq-fp16"])
def test_graphs_match_eager(kind, tmp_path):
    if kind == "fp32-tiny":
        source, dtype, tol = make_tiny_model(tmp_path / "m", seed=3), "float32", 1e-4
    else:
        source, dtype, tol = FIXTURES / "awq_gemm_g64", "float16", 2e-2
    eager, graphs = _run(source, False, dtype), _run(source, True, dtype)
    for e, g in zip(eager, graphs):
        assert e.token_ids == g.token_ids
        for le, lg in zip(e.logprobs, g.logprobs):
            assert abs(le.logprob - lg.logprob) < tol


@pytest.mark.parametrize("kind", ["fp32-tiny", "awq-fp16"])
def test_overlapped_steps_match_plain(kind, tmp_path):
    """Overlapped steps on the GPU: input ids come from the device's sampled tokens, read
    back through a pinned copy a step late; same tokens as reading every step at once."""
    from quantrt import LLM, SamplingParams

    if kind == "fp32-tiny":
        source, dtype = make_tiny_model(tmp_path / "m", seed=3), "float32"
    else:
        source, dtype = FIXTURES / "awq_gemm_g64", "float16"
    outs = {}
    for overlap in (False, True):
        llm = LLM(str(source), device="cuda", dtype=dtype, max_num_seqs=4, block_size=4,
                  overlap_steps=overlap)
        assert llm.engine.overlap == overlap and llm.engine.runner.graphs is not None
        params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0.0 if i % 2 else 0.7,
                                 seed=i, ignore_eos=True) for i in range(len(PROMPTS))]
        outs[overlap] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
        assert llm.engine._pending is None
    assert outs[True] == outs[False]


def test_utilization_budget_bounds_real_steps(tmp_path):
    """The profiled peaks (engine/memory_profile.py) hold what real steps allocate: a
    step of max_num_batched_tokens prompt tokens stays within the profiled prefill peak,
    and the engine's KV cache is what gpu_memory_utilization leaves."""
    import torch

    from quantrt import LLM, SamplingParams
    from quantrt.engine.memory_profile import profile
    from quantrt.loader import load

    source = make_tiny_model(tmp_path / "m", seed=4)
    lm = load(str(source), device="cuda", dtype="float32")
    prof = profile(lm, max_num_seqs=8, max_num_batched_tokens=512, block_size=4,
                   cuda_graphs=True, max_len=128)
    assert prof.prefill_peak > prof.decode_peak > 0
    assert 0 < prof.in_use < prof.total
    del lm
    llm = LLM(str(source), device="cuda", dtype="float32", gpu_memory_utilization=0.5,
              max_num_seqs=8, max_num_batched_tokens=512, block_size=4, max_model_len=128)
    blocks = llm.engine.blocks
    assert blocks.num_blocks == 8 * 128 // 4          # capped: every sequence at full length
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    prompts = [[(31 * i + j) % 200 + 1 for j in range(64)] for i in range(8)]   # 512 tokens
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 1.25 * prof.prefill_peak + (1 << 20)
    assert blocks.num_free == blocks.num_blocks
