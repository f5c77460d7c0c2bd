"""Decode attention over a paged KV cache in Triton (one new query per sequence).

Reads block tables and context lengths from device memory, so one launch serves any mix of
lengths and is safe to capture in a CUDA graph (no host-side shapes depend on the lengths).

One program per (sequence, KV head, context split): the ``GROUP`` query heads that share
the KV head are processed together as the rows of tensor-core dots, so each K/V block is
read once per KV head (GQA), with an online softmax in fp32 over tiles of
``TOKENS_PER_TILE`` tokens (gathered from several pages through the block table).  Long
contexts with few sequences are split over ``SPLITS`` programs (flash-decoding); the last
split of a (sequence, KV head) to finish merges the partial maxima, sums and outputs in the
same launch (a counter per pair, left at zero again), so a decode step costs one launch per
layer.

``softcap`` (Gemma 2) caps each score as ``cap * tanh(score / cap)``; a constexpr, so the
uncapped kernel compiles without it.

FP8 caches (``float8_e4m3fn`` / ``float8_e5m2``, scale 1.0) are upcast to q's dtype as
each tile is loaded; the dots and the softmax are the same as for a 16-bit cache.

The torch reference is ``quantrt.models.attention.paged_attention_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant_kernels.triton_wq_tile import split_locks

# Tokens per loop step.  The first kernel walked one 16-token page per step with a
# broadcast-multiply-sum: ~1.2 ms per layer for 256 sequences of ~650 tokens on the H100
# (10x the KV bytes' copy time), latency-bound on one page in flight.  Several pages per
# step as MMA tiles keep enough bytes in flight (scripts/bench_decode_attention.py).
TOKENS_PER_TILE = 64

FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, *FP8_CACHE_DTYPES)


def check_cache_dtype(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The attention kernels upcast (or round) each K/V tile they load to q's dtype, so a
    cache may be FP8 (scale 1.0) or a float dtype other than q's (``kv_cache_dtype``)."""
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"KV caches of {k_cache.dtype}/{v_cache.dtype} cannot be read: both "
                         "must be one of float32, float16, bfloat16, float8_e4m3fn, "
                         "float8_e5m2")


@triton.jit
def load_kv_tile(k_ptr, v_ptr, bt_row_ptr, pos, valid, kvh, offs_d, d_mask,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 PAGE: tl.constexpr, DTYPE: tl.constexpr):
    """K and V ([len(pos), D_PAD]) of positions ``pos`` of one sequence (``bt_row_ptr``: its
    block table row) for KV head ``kvh``, gathered through the block table: each token's
    page, then its slot; rows not ``valid`` read nothing (zeros).  An FP8 (scale 1.0) or
    other-dtype cache is cast to DTYPE in registers; a no-op for a cache of DTYPE."""
    page = tl.load(bt_row_ptr + pos // PAGE, mask=valid, other=0).to(tl.int64)
    slot = pos % PAGE
    kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + page[:, None] * stride_kb + slot[:, None] * stride_ks
                + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vs
                + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    return k.to(DTYPE), v.to(DTYPE)


@triton.jit
def _decode_kernel(
    # q [B, H, D]; caches [num_blocks, BLOCK_SIZE, Hk, D]; block tables [B, max_blocks] int32;
    # context lengths [B] int32; partial outputs [SPLITS, B, H, D] fp32, max/sum [SPLITS, B, H];
    # out [B, H, D]; counters [B * Hk] int32 (zero; left zero)
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, po_ptr, pm_ptr, pl_ptr, out_ptr, cnt_ptr,
    scale, window, softcap, B, H,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btb,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    # keys [lo, ctx): a sliding window keeps the last `window` of them (0: no window)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    first = lo // BLOCK_N
    n_tiles = tl.cdiv(ctx, BLOCK_N) - first
    per_split = tl.cdiv(n_tiles, SPLITS)
    t_lo = first + split * per_split
    t_hi = tl.minimum(t_lo + per_split, first + n_tiles)

    offs_g = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    # the GQA group's query heads are the rows of an MMA (padded to its 16-row minimum: the
    # tensor cores are idle in decode anyway, and a tile of BLOCK_N tokens per step keeps
    # BLOCK_N * D * 2 bytes of K and V in flight instead of one page)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        pos = t * BLOCK_N + offs_n
        s_mask = (pos < ctx) & (pos >= lo)
        # a tile spans BLOCK_N / BLOCK_SIZE pages of the block table
        k, v = load_kv_tile(k_ptr, v_ptr, bt_ptr + b * stride_btb, pos, s_mask, kvh, offs_d,
                            d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                            stride_vh, BLOCK_SIZE, q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [ROWS, BLOCK_N]
        if SOFTCAP:
            # tanh from exp of a non-positive argument, so it never overflows
            x = s / softcap
            e = tl.exp(-2.0 * tl.abs(x))
            th = (1.0 - e) / (1.0 + e)
            s = softcap * tl.where(x < 0, -th, th)
        s = tl.where(s_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # a split that has seen no key yet keeps m = -inf; exp of (-inf) - (-inf) is nan
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        p = tl.where(s_mask[None, :], tl.exp(s - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    gd_mask = g_mask[:, None] & d_mask[None, :]
    out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if SPLITS == 1:
        # context 0 (a padding row of a graph batch) has l = 0: its output is 0
        out = tl.where(l[:, None] > 0, acc / l[:, None], 0.0)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        row = (split * B + b) * H + heads
        tl.store(pm_ptr + row, m, mask=g_mask)
        tl.store(pl_ptr + row, l, mask=g_mask)
        tl.store(po_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gd_mask)
        tl.debug_barrier()  # every thread's partial is issued before the release below
        pair = b * tl.num_programs(1) + kvh
        count = tl.atomic_add(cnt_ptr + pair, 1, sem="acq_rel", scope="gpu")
        if count == SPLITS - 1:
            # the last split of this (sequence, KV head) merges all of them; .cg reads the
            # other programs' partials from L2, never a stale L1 line
            m_all = tl.full([ROWS], float("-inf"), dtype=tl.float32)
            for sp in tl.static_range(SPLITS):
                m_all = tl.maximum(m_all, tl.load(pm_ptr + (sp * B + b) * H + heads,
                                                  mask=g_mask, other=float("-inf"),
                                                  cache_modifier=".cg"))
            total = tl.zeros([ROWS], dtype=tl.float32)
            merged = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
            for sp in tl.static_range(SPLITS):
                r = (sp * B + b) * H + heads
                ms = tl.load(pm_ptr + r, mask=g_mask, other=float("-inf"), cache_modifier=".cg")
                w = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - m_all))
                total += w * tl.load(pl_ptr + r, mask=g_mask, other=0.0, cache_modifier=".cg")
                merged += w[:, None] * tl.load(po_ptr + r[:, None] * HEAD_DIM + offs_d[None, :],
                                               mask=gd_mask, other=0.0, cache_modifier=".cg")
            out = tl.where(total[:, None] > 0, merged / total[:, None], 0.0)
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=gd_mask)
            tl.atomic_xchg(cnt_ptr + pair, 0)


def pick_splits(batch: int, kv_heads: int, max_tokens: int, device: torch.device,
                tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """Context splits so that sequences x KV heads x splits fills the GPU (flash-decoding),
    each split keeping at least two tiles of the longest context (``max_tokens``: the block
    table's width in tokens); a function of shapes only, so a captured graph keeps a valid
    choice."""
    tiles = -(-max_tokens // tokens_per_tile)
    if device.type != "cuda":
        return 2 if tiles >= 2 else 1  # exercise the merge in interpreted tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * kv_heads
    splits = 1
    while programs * splits * 2 <= 2 * sms and splits * 4 <= tiles and splits < 16:
        splits *= 2
    return splits


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, splits: int | None = None,
                           softcap: float | None = None,
                           tokens_per_tile: int = TOKENS_PER_TILE) -> torch.Tensor:
    """q [B, H, D] (one query per sequence, at position context_len - 1) -> [B, H, D]."""
    bsz, heads, head_dim = q.shape
    _nb, block_size, kv_heads, d2 = k_cache.shape
    if d2 != head_dim or heads % kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    if block_tables.shape[0] != bsz or context_lens.shape != (bsz,):
        raise ValueError("block_tables / context_lens do not match the batch")
    if block_size & (block_size - 1) or block_size < 1:
        raise ValueError(f"block size must be a power of two, got {block_size}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous in the head dimension")
    if tokens_per_tile < 16 or tokens_per_tile & (tokens_per_tile - 1):
        raise ValueError(f"tokens_per_tile must be a power of two >= 16, got {tokens_per_tile}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    check_cache_dtype(q, k_cache, v_cache)
    group = heads // kv_heads
    if splits is None:
        splits = pick_splits(bsz, kv_heads, block_tables.shape[1] * block_size, q.device,
                             tokens_per_tile)
    out = torch.empty_like(q)
    if splits > 1:
        part = torch.empty(splits, bsz, heads, head_dim, device=q.device, dtype=torch.float32)
        pm = torch.empty(splits, bsz, heads, device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
        counters = split_locks(q.device)
        if bsz * kv_heads > counters.numel():
            raise ValueError(f"{bsz} sequences x {kv_heads} KV heads exceed the "
                             f"{counters.numel()} split counters")
    else:
        part = pm = pl = counters = out   # unused: one split writes its output directly
    d_pad = max(16, triton.next_power_of_2(head_dim))
    _decode_kernel[(bsz, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, pm, pl, out, counters,
        scale, sliding_window or 0, float(softcap or 1.0), bsz, heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_N=tokens_per_tile, SPLITS=splits,
        SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    return out
