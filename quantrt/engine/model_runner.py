"""The only part of the engine that touches the device: owns the KV cache, turns a
scheduled batch into model inputs (slot mapping, block tables), runs the model, samples."""
from __future__ import annotations

import torch

from quantrt.engine.block_manager import BlockManager
from quantrt.engine.outputs import TokenLogprob
from quantrt.engine.sampler import Sampler
from quantrt.engine.sequence import Sequence
from quantrt.loader import LoadedModel
from quantrt.models.attention import AttentionMetadata


def kv_bytes_per_token(lm: LoadedModel, kv_dtype: torch.dtype) -> int:
    cfg = lm.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(kv_dtype).bits // 8


class ModelRunner:
    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, *,
                 max_num_seqs: int = 64, max_model_len: int | None = None,
                 cuda_graphs: bool = True) -> None:
        self.lm = lm
        self.model = lm.model
        self.device = lm.device
        self.block_size = block_size
        cfg = lm.config
        use_graphs = cuda_graphs and self.device.type == "cuda"
        # One extra block that the block manager never hands out: padded rows of a graph
        # batch write their K/V there.
        shape = (num_blocks + int(use_graphs), block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=lm.dtype, device=self.device),
                           torch.zeros(shape, dtype=lm.dtype, device=self.device))
                          for _ in range(cfg.num_layers)]
        self.sampler = Sampler()
        self.graphs = None
        if use_graphs:
            from quantrt.engine.cuda_graphs import DecodeGraphs

            max_len = max_model_len or cfg.max_position_embeddings
            self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs,
                                       -(-max_len // block_size), num_blocks * block_size,
                                       self.device)

    def _prepare(self, batch: list[tuple[Sequence, int]], blocks: BlockManager):
        ids, pos, slots, ctx, qlens = [], [], [], [], []
        for seq, n in batch:
            start = seq.num_cached
            ids += seq.all_ids[start:start + n]
            pos += range(start, start + n)
            slots += blocks.slots(seq, start, n)
            ctx.append(start + n)
            qlens.append(n)
        width = max(len(seq.block_table) for seq, _ in batch)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in batch]
        dev = self.device
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            context_lens_host=ctx, query_lens_host=qlens)
        return (torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(pos, dtype=torch.int64, device=dev), meta, starts)

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]], blocks: BlockManager
             ) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Run one step; returns (sequence, next token, its logprobs) for every sequence whose
        last token was computed, plus the completions forked from a prompt just prefilled
        (they sample their first token from the same logits row)."""
        ids, pos, meta, starts = self._prepare(batch, blocks)
        all_logits = hidden = None
        if self.graphs is not None and self.graphs.fits(len(batch), meta.block_tables.shape[1]) \
                and all(n == 1 and seq.num_cached + 1 == len(seq) for seq, n in batch):
            all_logits = self.graphs.run(ids, pos, meta)  # decode-only: one row per sequence
        else:
            hidden = self.model(ids, pos, self.kv_caches, meta)
        rows, expand, sample_seqs = [], [], []
        for i, (seq, n) in enumerate(batch):
            seq.num_cached += n
            if seq.num_cached == len(seq):
                for s in [seq, *seq.fork_targets()]:
                    expand.append(len(rows))
                    sample_seqs.append(s)
                rows.append(starts[i + 1] - 1)
        if not sample_seqs:
            return []
        logits = (all_logits[rows] if all_logits is not None
                  else self.model.compute_logits(hidden[rows]))
        if len(expand) > len(rows):
            logits = logits[expand]
        tokens, logprobs = self.sampler(logits, sample_seqs)
        return list(zip(sample_seqs, tokens, logprobs))

    @torch.inference_mode()
    def logits_for(self, prompt_ids: list[int], blocks: BlockManager) -> torch.Tensor:
        """Logits at every position of a prompt (a test and evaluation helper)."""
        from quantrt.engine.sequence import SamplingParams

        seq = Sequence(list(prompt_ids), SamplingParams(max_tokens=1))
        blocks.grow(seq, len(seq))
        try:
            ids, pos, meta, _ = self._prepare([(seq, len(seq))], blocks)
            hidden = self.model(ids, pos, self.kv_caches, meta)
            return self.model.compute_logits(hidden)
        finally:
            blocks.release(seq)
