"""Triton paged prefill attention against the torch reference (quantrt.models.attention).

Interpreted on the CPU (TRITON_INTERPRET=1, small odd shapes) and on the GPU (larger shapes,
head dims 64-256).  Every batch packs several variable-length runs into one launch: plain
prompts, runs after a cached prefix (prefix caching) or earlier chunks (chunked prefill),
one-token runs; block tables are scattered; q is a strided view, as in the models.
Poison: the output starts as NaN, and every cache slot outside a sequence's context is NaN,
so a row left unwritten or a key read past a context's end fails the comparison.
Tolerance, absolute, on outputs ~N(0, 1) against an fp32 reference computed from the same
rounded inputs: 1e-4 (fp32), 2e-2 (fp16), 4e-2 (bf16).  bf16 runs on the GPU only: the
interpreter of Triton 3.9 computes tl.dot of bf16 operands wrongly (errors ~1e10 on a
plain 16x16 product).

GPU only:  PYTHONPATH=$PWD python -m pytest -q -m gpu tests/test_prefill_attention.py
"""
from __future__ import annotations

import os

import pytest
import torch

from quantrt.models.attention import AttentionMetadata, paged_attention, paged_attention_ref

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def _batch(ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype, device, seed=0):
    """Caches holding every sequence's context (NaN elsewhere), packed q, and metadata on
    `device`; fp32 CPU copies of the same values for the reference."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=g).to(dtype).float()
    v = torch.randn(shape, generator=g).to(dtype).float()
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need)
    tables, used = [], torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for c, n in zip(ctx_lens, need):
        own, order = order[:n], order[n:]
        for i in range(c):
            used[own[i // block_size] * block_size + i % block_size] = True
        tables.append(own + [0] * (width - n))  # padded with block 0, as the engine does
    for cache in (k, v):
        cache.view(-1, kv_heads, head_dim)[~used] = float("nan")
    tokens = sum(q_lens)
    # q as the models pass it: the first heads of a wider qkv row, so not contiguous in tokens
    qkv = torch.randn(tokens, heads + kv_heads, head_dim, generator=g).to(dtype).float()
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    i32 = dict(dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(tokens, dtype=torch.int64),
        block_tables=torch.tensor(tables, **i32), context_lens=torch.tensor(ctx_lens, **i32),
        query_start_loc=torch.tensor(starts, **i32), context_lens_host=list(ctx_lens),
        query_lens_host=list(q_lens))
    dev_meta = AttentionMetadata(
        slot_mapping=meta.slot_mapping.to(device), block_tables=meta.block_tables.to(device),
        context_lens=meta.context_lens.to(device),
        query_start_loc=meta.query_start_loc.to(device),
        context_lens_host=list(ctx_lens), query_lens_host=list(q_lens))
    qkv_dev = qkv.to(device=device, dtype=dtype)
    return (qkv_dev[:, :heads], k.to(device=device, dtype=dtype),
            v.to(device=device, dtype=dtype), dev_meta, (qkv[:, :heads], k, v, meta))


def _run(q, k, v, meta, scale, window, softcap, **kw):
    from quant_kernels.prefill_attention import paged_prefill_attention

    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    got = paged_prefill_attention(q, k, v, meta.block_tables, meta.context_lens,
                                  meta.query_start_loc, meta.max_query_len, scale, window,
                                  softcap, out=out, **kw)
    assert got is out and got.dtype == q.dtype
    return got.float().cpu()


def _check(case, dtype, device, **kw):
    ctx, qlens, h, hk, d, bs, window, softcap = case
    q, k, v, meta, (q0, k0, v0, meta0) = _batch(ctx, qlens, h, hk, d, bs, dtype, device)
    scale = d ** -0.5
    got = _run(q, k, v, meta, scale, window, softcap, **kw)
    want = paged_attention_ref(q0, k0, v0, meta0, scale, window, softcap)
    err = (got - want).abs().max().item()  # NaN (a row not written, a poisoned key) fails too
    assert err < TOL[dtype], f"max abs error {err}"


CASES = {  # ctx lens, query lens, heads, kv heads, head dim, block size, window, softcap
    "prompts": ([1, 17, 23], [1, 17, 23], 4, 4, 32, 16, None, None),
    "cached-prefix-gqa3": ([40, 23, 57], [17, 1, 23], 6, 2, 24, 16, None, None),
    "chunk-after-chunks": ([49, 23], [16, 6], 3, 1, 16, 16, None, None),
    "window": ([30, 17, 23], [23, 17, 1], 3, 1, 16, 16, 7, None),
    "softcap": ([23, 50], [23, 17], 4, 2, 32, 16, None, 1.0),
    "window-softcap-gqa3": ([41, 17], [17, 17], 6, 2, 16, 16, 9, 2.0),
    "head-dim-80-page-8": ([17, 23], [17, 5], 2, 1, 80, 8, None, None),
}


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interpreted(case, dtype):
    _check(case, dtype, "cpu")


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_interpreted_key_tile_spans_pages():
    # GPU tiles hold several pages; on the CPU the default is one page per key tile
    _check(CASES["cached-prefix-gqa3"], torch.float32, "cpu", tiles=(16, 32))
    _check(CASES["window"], torch.float32, "cpu", tiles=(32, 64))


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_interpreted_skip_decode_rows():
    """A mixed step: one-token runs stay untouched (the decode kernel owns them), the
    other rows are the reference's."""
    ctx, qlens, h, hk, d, bs = [9, 23, 1, 40], [1, 17, 1, 23], 4, 2, 16, 16
    q, k, v, meta, (q0, k0, v0, meta0) = _batch(ctx, qlens, h, hk, d, bs, torch.float32, "cpu")
    got = _run(q, k, v, meta, 0.3, None, None, skip_decode_rows=True)
    want = paged_attention_ref(q0, k0, v0, meta0, 0.3)
    decode_rows = torch.tensor([0, 18])
    assert got[decode_rows].isnan().all()
    keep = torch.ones(len(got), dtype=torch.bool)
    keep[decode_rows] = False
    assert (got[keep] - want[keep]).abs().max().item() < TOL[torch.float32]


def test_shape_errors():
    from quant_kernels.prefill_attention import paged_prefill_attention

    q, k, v, meta, _ = _batch([5, 3], [5, 2], 4, 2, 16, 4, torch.float32, "cpu")
    args = (meta.block_tables, meta.context_lens, meta.query_start_loc, 5, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        paged_prefill_attention(q[:, :3], k, v, *args)
    with pytest.raises(ValueError, match="one batch"):
        paged_prefill_attention(q, k, v, meta.block_tables, meta.context_lens,
                                meta.query_start_loc[:-1], 5, 1.0)
    with pytest.raises(ValueError, match="int32"):
        paged_prefill_attention(q, k, v, meta.block_tables.long(), meta.context_lens,
                                meta.query_start_loc, 5, 1.0)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_prefill_attention(q, k, v, meta.block_tables, meta.context_lens,
                                meta.query_start_loc, 8, 1.0)
    with pytest.raises(ValueError, match="softcap"):
        paged_prefill_attention(q, k, v, *args, softcap=0.0)
    with pytest.raises(ValueError, match="window"):
        paged_prefill_attention(q, k, v, *args, sliding_window=0)
    with pytest.raises(ValueError, match="out"):
        paged_prefill_attention(q, k, v, *args, out=torch.empty(6, 4, 16))


GPU_CASES = {  # larger runs: several tiles per run, long cached prefixes, real head dims
    "prompts-d64": ([1, 17, 129, 700], [1, 17, 129, 700], 8, 8, 64, 16, None, None),
    "prefix-d80-gqa4": ([300, 1024, 77], [45, 1024, 13], 8, 2, 80, 16, None, None),
    "chunked-d96-gqa3": ([2048, 513], [512, 256], 12, 4, 96, 16, None, None),
    "mixed-d128-gqa8": ([1000, 1, 333, 64], [1, 1, 300, 64], 32, 4, 128, 16, None, None),
    "window-d128": ([900, 4000], [600, 512], 8, 2, 128, 16, 256, None),
    "gemma2-d256": ([777, 300], [777, 31], 8, 4, 256, 16, 512, 50.0),
    "softcap-d256-page32": ([129, 64], [129, 17], 2, 1, 256, 32, None, 1.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu(case, dtype):
    _check(case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("qlens", [[1, 6, 1, 3, 1], [1, 1, 6, 3], [6, 3]],
                         ids=["mixed", "decodes-first", "prefill-only"])
def test_gpu_paged_attention_dispatch(qlens):
    """The models' entry point on CUDA: prefill runs (alone or beside decode rows) through
    the Triton prefill kernel, decode rows through the decode kernel."""
    ctx = [c + n for c, n in zip([8, 0, 40, 10, 3], qlens)]
    q, k, v, meta, (q0, k0, v0, meta0) = _batch(ctx, qlens, 6, 2, 64, 16, torch.float16,
                                                "cuda", seed=3)
    for window, softcap in ((None, None), (5, 3.0)):
        got = paged_attention(q, k, v, meta, 0.125, window, softcap).float().cpu()
        want = paged_attention_ref(q0, k0, v0, meta0, 0.125, window, softcap)
        assert (got - want).abs().max().item() < TOL[torch.float16]


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("qlens", [[1, 6, 1, 3, 1], [1, 1, 6, 3], [6, 3], [1, 1]],
                         ids=["mixed", "decodes-first", "prefill-only", "decode-only"])
def test_interpreted_paged_attention_dispatch(qlens):
    """The models' CUDA path, interpreted: prefill runs (alone or beside decode rows) through
    the prefill kernel, decode rows through the decode kernel, every row back in place."""
    from quantrt.models.attention import paged_attention_triton

    ctx = [c + n for c, n in zip([8, 0, 40, 10, 3], qlens)]
    q, k, v, meta, (q0, k0, v0, meta0) = _batch(ctx, qlens, 6, 2, 16, 16, torch.float32,
                                                "cpu", seed=3)
    for window, softcap in ((None, None), (5, 3.0)):
        got = paged_attention_triton(q, k, v, meta, 0.3, window, softcap)
        want = paged_attention_ref(q0, k0, v0, meta0, 0.3, window, softcap)
        assert (got - want).abs().max().item() < TOL[torch.float32]


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_interpreted_engine_matches_reference(tmp_path, monkeypatch):
    """The engine with the models' attention on the CUDA path (interpreted): chunked prefill
    beside decodes, a prefix-cache hit, Gemma 2's soft-cap and sliding window; the same
    greedy tokens as the torch reference path, log-probabilities within 1e-4."""
    import quantrt.models.blocks as blocks
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.engine.sequence import SamplingParams
    from quantrt.loader import load
    from quantrt.models.attention import paged_attention_triton
    from tests.tiny_models import make_tiny_model

    lm = load(make_tiny_model(tmp_path / "m", "gemma2"), device="cpu", progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 23)]
    prompts.append(prompts[1][:16] + [5, 6, 7])  # a full block in common with prompt 1
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)
    runs = []
    for attention in (paged_attention_ref, paged_attention_triton):
        monkeypatch.setattr(blocks, "paged_attention", attention)
        eng = LLMEngine(lm, EngineConfig(kv_cache_memory=4 << 20, block_size=16,
                                         max_num_batched_tokens=20))
        runs.append(eng.generate(prompts, sp))
        assert eng.blocks.num_free == eng.blocks.num_blocks
    assert any(s.num_prefix_hits for s in runs[1])
    for want, got in zip(*runs):
        assert got.output_ids == want.output_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(want.logprobs, got.logprobs)) < 1e-4
