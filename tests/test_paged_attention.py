"""Triton paged decode attention against the torch reference (quantrt.models.attention), on
the CPU under TRITON_INTERPRET=1 and on the GPU: odd context lengths, GQA groups of 1-4
(incl. non-powers of two), odd head dims, scattered block tables, sliding windows, several
context splits.  Tolerance: 2e-3 (fp32 inputs) / 2e-2 (fp16), absolute, outputs ~N(0, 1)."""
from __future__ import annotations

import os

import pytest
import torch

from quantrt.models.attention import AttentionMetadata, paged_attention_ref

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _case(ctx_lens, heads, kv_heads, head_dim, block_size, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // block_size) for c in ctx_lens)
    num_blocks = len(ctx_lens) * max_blocks + 3
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g)
    tables = order[:len(ctx_lens) * max_blocks].reshape(len(ctx_lens), max_blocks).int()
    q = torch.randn(len(ctx_lens), heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(ctx_lens), dtype=torch.int64), block_tables=tables,
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        query_start_loc=torch.arange(len(ctx_lens) + 1, dtype=torch.int32),
        context_lens_host=list(ctx_lens), query_lens_host=[1] * len(ctx_lens))
    mv = lambda t: t.to(device)  # noqa: E731
    return mv(q), mv(k), mv(v), mv(tables), mv(meta.context_lens), meta, (q, k, v)


CASES = [  # ctx lens, heads, kv heads, head dim, block size, window, splits
    ([1, 17, 23], 4, 2, 32, 4, None, None),
    ([40], 3, 1, 24, 16, None, 3),
    ([5, 33], 6, 2, 16, 8, 9, 2),
    ([16, 1, 70], 2, 2, 32, 16, 20, None),
    ([9, 50, 2], 8, 2, 24, 4, None, 1),      # one split: the output is written directly
    ([3, 45], 5, 1, 16, 4, None, 16),        # more splits than blocks: empty splits merge too
]


def _check(case, dtype, device):
    from quant_kernels.paged_attention import paged_decode_attention

    ctx, h, hk, d, bs, window, splits = case
    q, k, v, tables, lens, meta, (q0, k0, v0) = _case(ctx, h, hk, d, bs, dtype, device)
    scale = d ** -0.5
    got = paged_decode_attention(q, k, v, tables, lens, scale, window, splits)
    want = paged_attention_ref(q0.float(), k0.float(), v0.float(), meta, scale, window)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype
    assert (got.float().cpu() - want).abs().max().item() < tol


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interpreted(case, dtype):
    _check(case, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu(case, dtype):
    _check(case, dtype, "cuda")


def _padded_rows_and_counters(device):
    from quant_kernels.paged_attention import paged_decode_attention
    from quant_kernels.triton_wq_tile import split_locks

    q, k, v, tables, lens, _, _ = _case([7, 30, 12], 4, 2, 16, 4, torch.float32, device)
    lens[1] = 0   # a padding row of a graph batch: no keys, output zeros
    for splits in (1, 3):
        out = paged_decode_attention(q, k, v, tables, lens, 0.25, None, splits)
        assert out[1].abs().max().item() == 0 and out[0].abs().max().item() > 0
        assert not split_locks(q.device)[:8].any()   # every merge re-armed its counter


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_padded_rows_and_counters_interpreted():
    _padded_rows_and_counters("cpu")


@pytest.mark.gpu
def test_padded_rows_and_counters_gpu():
    _padded_rows_and_counters("cuda")


def test_shape_errors():
    from quant_kernels.paged_attention import paged_decode_attention

    q, k, v, tables, lens, _, _ = _case([3], 4, 2, 16, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention(q[:, :3], k, v, tables, lens, 1.0)
    with pytest.raises(ValueError, match="batch"):
        paged_decode_attention(q, k, v, tables, lens.repeat(2), 1.0)
    for tile in (8, 48):
        with pytest.raises(ValueError, match="tokens_per_tile"):
            paged_decode_attention(q, k, v, tables, lens, 1.0, tokens_per_tile=tile)


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("tile", [16, 32])
def test_tile_sizes_interpreted(tile):
    """Tiles smaller than the default: several tiles per split, one page per tile or a
    tile over several pages, the same result."""
    from quant_kernels.paged_attention import paged_decode_attention

    q, k, v, tables, lens, meta, (q0, k0, v0) = _case([5, 41, 70], 4, 2, 16, 8,
                                                       torch.float32, "cpu")
    got = paged_decode_attention(q, k, v, tables, lens, 0.25, None, 2, tokens_per_tile=tile)
    want = paged_attention_ref(q0.float(), k0.float(), v0.float(), meta, 0.25, None)
    assert (got - want).abs().max().item() < 2e-3


@pytest.mark.gpu
def test_mixed_decode_and_prefill_step():
    """A continuous-batching step: decode rows on the Triton decode kernel, prefill chunks on
    the Triton prefill kernel, outputs back in their rows."""
    from quantrt.models.attention import paged_attention

    g = torch.Generator().manual_seed(5)
    bs, hk, h, d = 4, 2, 4, 32
    ctx, qlens = [9, 6, 1, 13], [1, 6, 1, 3]
    k = torch.randn(20, bs, hk, d, generator=g)
    v = torch.randn(20, bs, hk, d, generator=g)
    tables = torch.randperm(20, generator=g)[:16].reshape(4, 4).int()
    q = torch.randn(sum(qlens), h, d, generator=g)
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(slot_mapping=torch.zeros(sum(qlens), dtype=torch.int64),
                             block_tables=tables, context_lens=torch.tensor(ctx, dtype=torch.int32),
                             query_start_loc=torch.tensor(starts, dtype=torch.int32),
                             context_lens_host=ctx, query_lens_host=qlens)
    want = paged_attention_ref(q, k, v, meta, 0.2)
    cuda_meta = AttentionMetadata(
        slot_mapping=meta.slot_mapping.cuda(), block_tables=tables.cuda(),
        context_lens=meta.context_lens.cuda(), query_start_loc=meta.query_start_loc.cuda(),
        context_lens_host=ctx, query_lens_host=qlens)
    got = paged_attention(q.cuda(), k.cuda(), v.cuda(), cuda_meta, 0.2)
    assert (got.cpu() - want).abs().max().item() < 2e-3
