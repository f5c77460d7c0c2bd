"""CUDA graphs of the decode forward at bucketed batch sizes.

A decode step of a small model is a few hundred tiny kernels; launching them from Python
costs several times their GPU time.  Replaying a captured graph costs one launch.  Graphs
need static shapes and addresses, so inputs are copied into fixed buffers sized for the
largest bucket, and a batch is padded up to the next bucket:

* padded rows write their K/V to a scratch block that the block manager never hands out,
  and have context length 0 (the decode kernel returns zeros for them);
* block tables are padded to the longest context the engine allows, so any step fits.

Only decode-only batches replay (the Triton decode attention reads lengths and block
tables from device memory, so one capture serves every mix of lengths); prefill and mixed
steps run eagerly.
"""
from __future__ import annotations

import torch
from torch import nn

from quantrt.models.attention import AttentionMetadata


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16: padding wastes at most 15 rows of tiny decode work."""
    out = [b for b in (1, 2, 4, 8) if b <= max_batch]
    out += list(range(16, max_batch + 1, 16))
    if not out or out[-1] < max_batch:
        out.append(max_batch)
    return out


class DecodeGraphs:
    def __init__(self, model: nn.Module, kv_caches: list, max_batch: int, max_blocks: int,
                 scratch_slot: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_slot
        b = self.buckets[-1]
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.ids = torch.zeros(b, **i64)
        self.pos = torch.zeros(b, **i64)
        self.slots = torch.full((b,), scratch_slot, **i64)
        self.tables = torch.zeros(b, max_blocks, **i32)
        self.ctx = torch.zeros(b, **i32)
        self.qstart = torch.arange(b + 1, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _meta(self, b: int) -> AttentionMetadata:
        # host lengths only feed the torch reference path, which decode graphs never take
        return AttentionMetadata(slot_mapping=self.slots[:b], block_tables=self.tables[:b],
                                 context_lens=self.ctx[:b], query_start_loc=self.qstart[:b + 1],
                                 context_lens_host=[1] * b, query_lens_host=[1] * b)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        self.ctx.fill_(1)  # warm-up steps attend to one (scratch) key
        self.tables.fill_(self.scratch_slot // self.kv_caches[0][0].shape[1])
        for b in reversed(self.buckets):  # largest first: smaller ones reuse its pool
            meta = self._meta(b)
            # eager warm-up: runs the autotuners and compiles every kernel for this shape,
            # which must not happen inside a capture
            for _ in range(2):
                self.model.compute_logits(self.model(self.ids[:b], self.pos[:b],
                                                     self.kv_caches, meta))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(self.ids[:b], self.pos[:b], self.kv_caches, meta)
                out = self.model.compute_logits(hidden)
            if pool is None:
                pool = graph.pool()
            self.graphs[b] = graph
            self.outputs[b] = out
        self.ctx.zero_()
        self.tables.zero_()
        torch.cuda.synchronize()

    def fits(self, batch: int, width: int) -> bool:
        return batch <= self.buckets[-1] and width <= self.max_blocks

    def run(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [n, vocab] (fp32) of a decode-only batch of n sequences."""
        n = ids.shape[0]
        b = next(x for x in self.buckets if x >= n)
        width = meta.block_tables.shape[1]
        self.ids[:n].copy_(ids)
        self.pos[:n].copy_(pos)
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:b].fill_(self.scratch_slot)
        self.tables[:n, :width].copy_(meta.block_tables)
        self.ctx[:n].copy_(meta.context_lens)
        self.ctx[n:b].zero_()
        self.graphs[b].replay()
        return self.outputs[b][:n]
