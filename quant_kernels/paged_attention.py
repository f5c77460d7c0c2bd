"""Decode attention over a paged KV cache in Triton (one new query per sequence).

Reads block tables and context lengths from device memory, so one launch serves any mix of
lengths and is safe to capture in a CUDA graph (no host-side shapes depend on the lengths).

One program per (sequence, KV head, context split): the ``GROUP`` query heads that share
the KV head are processed together, so each K/V block is read once per KV head (GQA), with
an online softmax in fp32 over ``BLOCK_SIZE``-token pages.  Long contexts with few
sequences are split over ``SPLITS`` programs (flash-decoding); the last split of a
(sequence, KV head) to finish merges the partial maxima, sums and outputs in the same launch
(a counter per pair, left at zero again), so a decode step costs one launch per layer.

``softcap`` (Gemma 2) caps each score as ``cap * tanh(score / cap)``; a constexpr, so the
uncapped kernel compiles without it.

The torch reference is ``quantrt.models.attention.paged_attention_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant_kernels.triton_wq_tile import split_locks


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
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLITS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    # keys [lo, ctx): a sliding window keeps the last `window` of them (0: no window)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    first_blk = lo // BLOCK_SIZE
    n_blk = tl.cdiv(ctx, BLOCK_SIZE) - first_blk
    per_split = tl.cdiv(n_blk, SPLITS)
    blk_lo = first_blk + split * per_split
    blk_hi = tl.minimum(blk_lo + per_split, first_blk + n_blk)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_s = tl.arange(0, BLOCK_SIZE)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q * scale

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    for i in range(blk_lo, blk_hi):
        page = tl.load(bt_ptr + b * stride_btb + i).to(tl.int64)
        pos = i * BLOCK_SIZE + offs_s
        s_mask = (pos < ctx) & (pos >= lo)
        kv_mask = s_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + page * stride_kb + offs_s[:, None] * stride_ks + kvh * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + page * stride_vb + offs_s[:, None] * stride_vs + kvh * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        # [G, S]: decode is bandwidth-bound, so broadcast-multiply-sum instead of tl.dot
        # (whose 16-row minimum would waste most of a GQA group of 1-8 heads)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        if SOFTCAP:
            # tanh from exp of a non-positive argument, so it never overflows
            x = s / softcap
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            s = softcap * tl.where(x < 0, -t, t)
        s = tl.where(s_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # a split that has seen no key yet keeps m = -inf; exp of (-inf) - (-inf) is nan
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        p = tl.where(s_mask[None, :], tl.exp(s - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
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
            m_all = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
            for sp in tl.static_range(SPLITS):
                m_all = tl.maximum(m_all, tl.load(pm_ptr + (sp * B + b) * H + heads,
                                                  mask=g_mask, other=float("-inf"),
                                                  cache_modifier=".cg"))
            total = tl.zeros([GROUP_PAD], dtype=tl.float32)
            merged = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
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


def pick_splits(batch: int, kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Context splits so that sequences x KV heads x splits fills the GPU (flash-decoding);
    a function of shapes only, so a captured graph keeps a valid choice."""
    if device.type != "cuda":
        return 2 if max_blocks >= 2 else 1  # exercise the merge in interpreted tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * kv_heads
    splits = 1
    while programs * splits * 2 <= 2 * sms and splits * 2 <= max(1, max_blocks // 4) \
            and splits < 16:
        splits *= 2
    return splits


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, splits: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
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
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    group = heads // kv_heads
    if splits is None:
        splits = pick_splits(bsz, kv_heads, block_tables.shape[1], q.device)
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
    d_pad = triton.next_power_of_2(head_dim)
    _decode_kernel[(bsz, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, pm, pl, out, counters,
        scale, sliding_window or 0, float(softcap or 1.0), bsz, heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, SPLITS=splits, SOFTCAP=softcap is not None, num_warps=4)
    return out
