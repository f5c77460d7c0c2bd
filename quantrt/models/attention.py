"""Paged attention: the interface every model is written against, and its torch reference.

The KV cache of one layer is a pair of tensors ``[num_blocks, block_size, kv_heads, head_dim]``.
A batch is a flat list of new tokens (``T``) from ``B`` sequences; per sequence the metadata
gives where its new tokens start (``query_start_loc``), its total length after this step
(``context_lens``) and its block table.  ``slot_mapping`` says where each new token's K/V
is written (``block * block_size + offset``).

Options per call (so per layer): a sliding window (the last ``sliding_window`` keys only)
and a soft-cap of the scores (``cap * tanh(scores / cap)``, Gemma 2).  The KV cache keeps
every key of a sliding layer too: correct, not minimal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant_kernels import cpu_layers


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [T] int64
    block_tables: torch.Tensor      # [B, max_blocks] int32 (padded with 0)
    context_lens: torch.Tensor      # [B] int32: tokens in cache after this step
    query_start_loc: torch.Tensor   # [B + 1] int32: prefix sums of new-token counts
    # Host copies, so the reference path never syncs with the device to learn lengths.
    context_lens_host: list[int]
    query_lens_host: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_host) if self.query_lens_host else 0


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to a KV cache's dtype.  FP8 (per-tensor scale 1.0) clamps to the format's
    finite range first: torch's cast of a larger value is not a saturation everywhere
    (e5m2 gives inf, e4m3fn NaN on some builds), and one inf or NaN key would poison every
    later query's softmax."""
    if dtype.is_floating_point and dtype.itemsize == 1:
        big = torch.finfo(dtype).max
        x = x.clamp(-big, big)
    return x.to(dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, kv_heads, head_dim]) into their cache slots (cast to the
    cache's dtype, see ``to_cache_dtype``)."""
    if k_cache.dtype == k.dtype and cpu_layers.fits(k):
        return cpu_layers.write_kv(k_cache, v_cache, k, v, slot_mapping)
    nb, bs, h, d = k_cache.shape
    if k.dtype != k_cache.dtype:
        k, v = to_cache_dtype(k, k_cache.dtype), to_cache_dtype(v, v_cache.dtype)
    k_cache.view(nb * bs, h, d)[slot_mapping] = k
    v_cache.view(nb * bs, h, d)[slot_mapping] = v


def _context_plan(meta: AttentionMetadata, block_size: int, device: torch.device,
                  sliding_window: int | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per sequence: the flat cache slots of its context and its attention mask (None when
    every query sees every key).  The same for every layer with this window, so computed
    once per step and window."""
    plans = meta.__dict__.setdefault("_ref_plans", {})
    plan = plans.get(sliding_window)
    if plan is not None:
        return plan
    plan = []
    for b, (ctx, qlen) in enumerate(zip(meta.context_lens_host, meta.query_lens_host)):
        nblocks = -(-ctx // block_size)
        blocks = meta.block_tables[b, :nblocks].long()
        slots = (blocks.unsqueeze(1) * block_size
                 + torch.arange(block_size, device=device)).reshape(-1)[:ctx]
        mask = None
        if qlen > 1 or (sliding_window is not None and ctx > sliding_window):
            qpos = torch.arange(ctx - qlen, ctx, device=device).unsqueeze(1)
            kpos = torch.arange(ctx, device=device).unsqueeze(0)
            mask = kpos <= qpos
            if sliding_window is not None:
                mask &= (qpos - kpos) < sliding_window
        plan.append((slots, mask))
    plans[sliding_window] = plan
    return plan


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float,
                        sliding_window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context.

    q: [T, heads, head_dim] -> [T, heads, head_dim].  Query ``i`` of a sequence with
    ``c`` cached tokens and ``n`` new ones sits at position ``c - n + i`` and sees keys
    ``0 ..= c - n + i`` (only the last ``sliding_window`` of them when a window is set).
    ``softcap``: scores (after ``scale``) become ``softcap * tanh(scores / softcap)``.
    """
    nb, block_size, kv_heads, head_dim = k_cache.shape
    heads = q.shape[1]
    k_flat = k_cache.view(nb * block_size, kv_heads, head_dim)
    v_flat = v_cache.view(nb * block_size, kv_heads, head_dim)
    plan = _context_plan(meta, block_size, q.device, sliding_window)
    outs = []
    start = 0
    group = heads // kv_heads
    for (slots, mask), qlen in zip(plan, meta.query_lens_host):
        if qlen == 0:
            continue
        k = k_flat.index_select(0, slots)
        v = v_flat.index_select(0, slots)
        if k.dtype != q.dtype:   # an FP8 (or other dtype) cache: upcast what was gathered
            k, v = k.to(q.dtype), v.to(q.dtype)
        if qlen == 1 and mask is None:
            # Decode: grouped query heads against their shared KV head as two small batched
            # matmuls (SDPA's GQA path on CPU costs several times more at this size).
            qh = q[start].view(kv_heads, group, head_dim)
            scores = torch.matmul(qh, k.permute(1, 2, 0)) * scale          # [Hk, G, ctx]
            o = torch.matmul(_capped(scores, softcap).softmax(-1), v.transpose(0, 1))
            outs.append(o.reshape(1, heads, head_dim))                     # [Hk, G, D]
        elif softcap is not None:
            # SDPA has no soft-cap: scores, cap, mask, softmax (in fp32, as transformers).
            qs = q[start:start + qlen].transpose(0, 1)                      # [H, q, D]
            kh = k.transpose(0, 1).repeat_interleave(group, dim=0)          # [H, ctx, D]
            vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
            scores = _capped(torch.matmul(qs, kh.transpose(1, 2)) * scale, softcap)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            o = torch.matmul(scores.float().softmax(-1).to(q.dtype), vh)
            outs.append(o.transpose(0, 1))
        else:
            qs = q[start:start + qlen].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, k.transpose(0, 1), v.transpose(0, 1),
                                               attn_mask=mask, scale=scale,
                                               enable_gqa=heads != kv_heads)
            outs.append(o.transpose(0, 1))
        start += qlen
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _decode_rows(meta: AttentionMetadata
                 ) -> tuple[torch.Tensor | slice, torch.Tensor, torch.Tensor]:
    """A mixed step's one-token runs: their rows in q, block tables and context lengths
    (built once per step, shared by every layer)."""
    cached = meta.__dict__.get("_decode_rows")
    if cached is not None:
        return cached
    seqs, rows, start = [], [], 0
    for i, n in enumerate(meta.query_lens_host):
        if n == 1:
            seqs.append(i)
            rows.append(start)
        start += n
    if seqs[-1] == len(seqs) - 1:
        # the usual order (running decodes first, then prompt chunks): views, no gathers
        k = len(seqs)
        cached = (slice(0, k), meta.block_tables[:k], meta.context_lens[:k])
    else:
        both = torch.tensor(rows + seqs, device=meta.block_tables.device)  # one copy for two
        idx = both[len(rows):]
        cached = (both[:len(rows)], meta.block_tables[idx], meta.context_lens[idx])
    meta.__dict__["_decode_rows"] = cached
    return cached


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """The models' attention.  On CUDA, Triton: a decode-only step runs the paged decode
    kernel (device-side lengths: CUDA-graph safe); any other step runs the prefill kernel
    over all its runs in one launch, and in a step that mixes decodes with prefill chunks
    the decode kernel fills the one-token rows (the prefill kernel skips them: a tile of
    64 query rows for one token would waste most of its work).  Elsewhere: the torch
    reference."""
    if not q.is_cuda:
        if k_cache.dtype == q.dtype and cpu_layers.fits(q):
            return cpu_layers.paged_attention(q, k_cache, v_cache, meta, scale, sliding_window,
                                              softcap)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
    return paged_attention_triton(q, k_cache, v_cache, meta, scale, sliding_window, softcap)


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float,
                           sliding_window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """The CUDA path of ``paged_attention`` (also runs on CPU tensors under
    TRITON_INTERPRET=1, which is how the CPU tests reach it)."""
    from quant_kernels.paged_attention import paged_decode_attention

    if meta.max_query_len == 1:
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                      scale, sliding_window, softcap=softcap)
    from quant_kernels.prefill_attention import paged_prefill_attention

    mixed = 1 in meta.query_lens_host
    out = paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                  meta.query_start_loc, meta.max_query_len, scale,
                                  sliding_window, softcap, skip_decode_rows=mixed)
    if mixed:
        rows, tables, lens = _decode_rows(meta)
        out[rows] = paged_decode_attention(q[rows], k_cache, v_cache, tables, lens, scale,
                                           sliding_window, softcap=softcap)
    return out
