"""Prefill attention over a paged KV cache in Triton: variable-length query runs, one launch.

A step packs the new tokens of ``B`` sequences into ``q [T, H, D]``; sequence ``b`` owns rows
``query_start_loc[b] .. query_start_loc[b + 1]`` and has ``context_lens[b]`` tokens in the
cache after this step (its new K/V already written).  Its new tokens are the last ones of
that context, so query ``i`` of a run of ``n`` sits at position ``ctx - n + i`` and sees keys
``0 ..= ctx - n + i``: a cached prefix (prefix caching) or earlier chunks (chunked prefill)
are attended like any other key, read through the block table.

One program per (query head, sequence, query tile of ``BLOCK_M`` tokens): flash attention
with an online softmax in fp32 (exp2 domain), ``tl.dot`` on the input dtype with fp32
accumulation.  Key tiles of ``BLOCK_N`` positions gather their rows through the block table
one position at a time, so any page size works and a tile may span pages.  Only the key
range some row of the tile can see is visited: the causal end, and with a sliding window
the start.  Tiles past a sequence's query run exit at once, so the grid can be sized by the
longest run from host lengths, with no per-step index tensor.

``softcap`` (Gemma 2) caps each scaled score as ``cap * tanh(score / cap)``; a constexpr, so
the uncapped kernel compiles without it.  GQA: query head ``h`` reads KV head
``h // (H / Hk)``; the K/V tiles of a group's heads are re-read from L2, not HBM, as its
programs are launched next to each other.

FP8 caches (scale 1.0) are upcast to q's dtype as each K/V tile is loaded.

The torch reference is ``quantrt.models.attention.paged_attention_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant_kernels.paged_attention import check_cache_dtype, load_kv_tile


@triton.jit
def _prefill_kernel(
    # q / out [T, H, D]; caches [num_blocks, PAGE, Hk, D]; block tables [B, max_blocks] int32;
    # context lengths [B] int32; query_start_loc [B + 1] int32
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, ctx_ptr, qsl_ptr,
    qk_scale, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    SKIP_DECODE: tl.constexpr,
):
    # launch order: heads fastest, so a GQA group's programs run side by side and share
    # their K/V tiles in L2; query tiles slowest and last tiles (the most keys) first, so
    # the long programs do not trail at the end of the launch
    h = tl.program_id(0)
    b = tl.program_id(1)
    tile = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    qlen = tl.load(qsl_ptr + b + 1) - q_start
    m0 = tile * BLOCK_M
    if m0 >= qlen:
        return
    if SKIP_DECODE and qlen == 1:
        return
    ctx = tl.load(ctx_ptr + b)
    first_pos = ctx - qlen  # position of the run's first query
    kvh = h // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < qlen
    d_mask = offs_d < HEAD_DIM
    q_pos = first_pos + offs_m
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    # keys [lo, hi) cover every row of the tile: the last row sees up to itself, the first
    # row (with a window) no further back than window - 1
    hi = tl.minimum(first_pos + m0 + BLOCK_M, ctx)
    lo = tl.where(window > 0, tl.maximum(first_pos + m0 - window + 1, 0), 0)
    lo = (lo // BLOCK_N) * BLOCK_N

    # a finite start for the running max: a padded row that never sees a key keeps it and
    # exp2 of (-inf) - (finite) is 0, never nan
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + offs_n
        n_mask = k_pos < hi
        k, v = load_kv_tile(k_ptr, v_ptr, bt_ptr + b * stride_btb, k_pos, n_mask, kvh, offs_d,
                            d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                            stride_vh, PAGE, q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            # cap the natural-unit score, then move to the exp2 domain; tanh from exp of a
            # non-positive argument, so it never overflows
            x = s * (qk_scale / softcap)
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            s = (softcap * 1.4426950408889634) * tl.where(x < 0, -t, t)
        else:
            s = s * (qk_scale * 1.4426950408889634)
        visible = n_mask[None, :] & (k_pos[None, :] <= q_pos[:, None])
        visible = visible & ((window <= 0) | (q_pos[:, None] - k_pos[None, :] < window))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # every real row sees at least its own key (written before this call), so l_i > 0 there;
    # padded rows are masked out of the store
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _pow2(n: int) -> int:
    # triton.next_power_of_2 costs microseconds per call; this runs per layer per step
    return 1 << (n - 1).bit_length()


def pick_tiles(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).  On the CPU interpreter small tiles, so
    short odd runs still cross tile edges in tests; on the GPU tiles that keep the q tile,
    two K/V stages and the fp32 accumulator within shared memory and registers
    (head dim 256 halves the key tile)."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    d_pad = _pow2(head_dim)
    if d_pad <= 64:
        return 64, 64, 4, 3
    if d_pad <= 128:
        return 64, 64, 4, 2
    return 64, 32, 8, 2


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor,
                            query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                            sliding_window: int | None = None, softcap: float | None = None,
                            out: torch.Tensor | None = None, skip_decode_rows: bool = False,
                            tiles: tuple[int, int] | None = None) -> torch.Tensor:
    """q [T, H, D] (packed runs of new tokens) -> [T, H, D] in q's dtype.

    ``max_query_len``: the longest run, a host int (it sizes the grid; a longer run than
    stated would be cut short, so callers pass the value they built the batch from).
    ``out``: written in place and returned (default: a new tensor).  ``skip_decode_rows``:
    runs of one token are left unwritten, for a mixed step whose decode rows the decode
    kernel computes, so prefill rows need no gather into a separate batch.
    ``tiles``: (BLOCK_M, BLOCK_N) to override the default choice (tests)."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [tokens, heads, head_dim] and the caches [blocks, "
                         f"block_size, kv_heads, head_dim], got {tuple(q.shape)} and "
                         f"{tuple(k_cache.shape)}")
    tokens, heads, head_dim = q.shape
    _nb, page, kv_heads, d2 = k_cache.shape
    if d2 != head_dim or heads % kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}")
    if head_dim > 256:
        raise ValueError(f"head dim {head_dim} is above the kernel's limit of 256")
    bsz = context_lens.shape[0]
    if context_lens.dim() != 1 or block_tables.dim() != 2 or block_tables.shape[0] != bsz \
            or query_start_loc.shape != (bsz + 1,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)}, context_lens "
                         f"{tuple(context_lens.shape)} and query_start_loc "
                         f"{tuple(query_start_loc.shape)} do not describe one batch")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens),
                    ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be fp16, bf16 or fp32, got {q.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous in the head dimension")
    check_cache_dtype(q, k_cache, v_cache)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding window must be >= 1, got {sliding_window}")
    if max_query_len < 0 or max_query_len > tokens:
        raise ValueError(f"max_query_len {max_query_len} is outside 0..{tokens} (the tokens "
                         "in q)")
    if out is None:
        out = torch.empty(tokens, heads, head_dim, device=q.device, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device \
            or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} must match q "
                         f"{tuple(q.shape)} {q.dtype} on {q.device}, contiguous in head_dim")
    if tokens == 0 or bsz == 0 or max_query_len == 0:
        return out
    block_m, block_n, warps, stages = pick_tiles(head_dim, q.device)
    if tiles is not None:
        block_m, block_n = tiles
    grid = (heads, bsz, -(-max_query_len // block_m))
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc,
        float(scale), sliding_window or 0, float(softcap or 1.0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, D_PAD=max(16, _pow2(head_dim)),
        PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, SOFTCAP=softcap is not None,
        IEEE=q.dtype == torch.float32, SKIP_DECODE=skip_decode_rows, num_warps=warps,
        num_stages=stages)
    return out
