"""Paged attention: the interface every model is written against, and its torch reference.

The KV cache of one layer is a pair of tensors ``[num_blocks, block_size, kv_heads, head_dim]``.
A batch is a flat list of new tokens (``T``) from ``B`` sequences; per sequence the metadata
gives where its new tokens start (``query_start_loc``), its total length after this step
(``context_lens``) and its block table.  ``slot_mapping`` says where each new token's K/V
is written (``block * block_size + offset``; -1 = do not store, e.g. padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, kv_heads, head_dim]) into their cache slots."""
    nb, bs, h, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(nb * bs, h, d)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(nb * bs, h, d)[slots] = v[keep].to(v_cache.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float,
                        sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context.

    q: [T, heads, head_dim] -> [T, heads, head_dim].  Query ``i`` of a sequence with
    ``c`` cached tokens and ``n`` new ones sits at position ``c - n + i`` and sees keys
    ``0 ..= c - n + i`` (only the last ``sliding_window`` of them when a window is set).
    """
    _, block_size, kv_heads, head_dim = k_cache.shape
    heads = q.shape[1]
    out = torch.empty_like(q)
    start = 0
    for b, (ctx, qlen) in enumerate(zip(meta.context_lens_host, meta.query_lens_host)):
        if qlen == 0:
            continue
        nblocks = -(-ctx // block_size)
        blocks = meta.block_tables[b, :nblocks].long()
        k = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:ctx]
        v = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:ctx]
        qs = q[start:start + qlen]
        mask = None
        if qlen > 1 or sliding_window is not None:
            qpos = torch.arange(ctx - qlen, ctx, device=q.device).unsqueeze(1)
            kpos = torch.arange(ctx, device=q.device).unsqueeze(0)
            allowed = kpos <= qpos
            if sliding_window is not None:
                allowed &= (qpos - kpos) < sliding_window
            mask = allowed
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0).to(q.dtype),
            v.transpose(0, 1).unsqueeze(0).to(q.dtype), attn_mask=mask, scale=scale,
            enable_gqa=heads != kv_heads)
        out[start:start + qlen] = o.squeeze(0).transpose(0, 1)
        start += qlen
    return out
