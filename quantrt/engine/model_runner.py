"""The only part of the engine that touches the device: owns the KV cache, turns a
scheduled batch into model inputs (slot mapping, block tables), runs the model, samples."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from quantrt.engine.block_manager import BlockManager
from quantrt.engine.outputs import TokenLogprob
from quantrt.engine.sampler import Sampler
from quantrt.engine.sequence import Sequence
from quantrt.loader import LoadedModel
from quantrt.models.attention import AttentionMetadata


@dataclass
class StepInputs:
    """One step's model inputs as plain lists: built on the host by rank 0 and, under
    tensor parallelism, broadcast to the other ranks, which run the same forward."""

    ids: list[int]
    pos: list[int]
    slots: list[int]
    tables: list[list[int]]
    ctx: list[int]
    qlens: list[int]
    rows: list[int]          # rows of the flat batch whose logits are needed
    decode_only: bool        # one new token per sequence: CUDA graphs may replay


def kv_heads(model: torch.nn.Module) -> int:
    """KV heads this process caches: all of them, or its rank's under tensor parallelism."""
    from quantrt.parallel.shard import local_kv_heads

    return local_kv_heads(model)


def kv_bytes_per_token(lm: LoadedModel, kv_dtype: torch.dtype) -> int:
    cfg = lm.config
    return 2 * cfg.num_layers * kv_heads(lm.model) * cfg.head_dim * torch.finfo(kv_dtype).bits // 8


class ModelRunner:
    """``executor``: under tensor parallelism (rank 0 only), every step's inputs are
    broadcast to the other ranks before this rank runs its part."""

    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, *,
                 max_num_seqs: int = 64, max_model_len: int | None = None,
                 cuda_graphs: bool = True, executor: Any = None) -> None:
        self.lm = lm
        self.model = lm.model
        self.device = lm.device
        self.block_size = block_size
        self.executor = executor
        cfg = lm.config
        use_graphs = cuda_graphs and self.device.type == "cuda"
        # One extra block that the block manager never hands out: padded rows of a graph
        # batch write their K/V there.
        shape = (num_blocks + int(use_graphs), block_size, kv_heads(self.model), cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=lm.dtype, device=self.device),
                           torch.zeros(shape, dtype=lm.dtype, device=self.device))
                          for _ in range(cfg.num_layers)]
        self.sampler = Sampler()
        self.graphs = None
        if use_graphs:
            from quantrt.engine.cuda_graphs import DecodeGraphs

            max_len = max_model_len or cfg.max_position_embeddings
            try:
                self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs,
                                           -(-max_len // block_size), num_blocks * block_size,
                                           self.device)
            except RuntimeError as exc:
                if self.model.tp_vocab_widths is None:
                    raise
                # Every rank captures the same graphs in lockstep, so every rank fails the
                # same way (a NCCL build that cannot capture collectives): all go eager.
                print(f"quantrt: warning: CUDA graphs with tensor parallelism failed to "
                      f"capture ({exc}); decoding eagerly", file=sys.stderr, flush=True)
                torch.cuda.synchronize()

    @staticmethod
    def _inputs(batch: list[tuple[Sequence, int]], blocks: BlockManager,
                rows: list[int]) -> StepInputs:
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
        decode = all(n == 1 and seq.num_cached + 1 == len(seq) for seq, n in batch)
        return StepInputs(ids, pos, slots, tables, ctx, qlens, rows, decode)

    def _tensors(self, inp: StepInputs):
        dev = self.device
        starts = [0]
        for n in inp.qlens:
            starts.append(starts[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(inp.slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(inp.tables, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(inp.ctx, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            context_lens_host=inp.ctx, query_lens_host=inp.qlens)
        return (torch.tensor(inp.ids, dtype=torch.int64, device=dev),
                torch.tensor(inp.pos, dtype=torch.int64, device=dev), meta)

    def execute(self, inp: StepInputs) -> torch.Tensor:
        """Logits of ``inp.rows`` (every rank of a tensor-parallel model runs this)."""
        if self.executor is not None:
            self.executor.call("execute", inp)
        return self.run_local(inp)

    @torch.inference_mode()
    def run_local(self, inp: StepInputs) -> torch.Tensor:
        ids, pos, meta = self._tensors(inp)
        if self.graphs is not None and inp.decode_only \
                and self.graphs.fits(len(inp.ctx), meta.block_tables.shape[1]):
            return self.graphs.run(ids, pos, meta)[inp.rows]  # one row per sequence
        hidden = self.model(ids, pos, self.kv_caches, meta)
        return self.model.compute_logits(hidden[inp.rows])

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]], blocks: BlockManager
             ) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Run one step; returns (sequence, next token, its logprobs) for every sequence whose
        last token was computed, plus the completions forked from a prompt just prefilled
        (they sample their first token from the same logits row)."""
        rows, expand, sample_seqs, end = [], [], [], 0
        for seq, n in batch:
            end += n
            if seq.num_cached + n == len(seq):
                for s in [seq, *seq.fork_targets()]:
                    expand.append(len(rows))
                    sample_seqs.append(s)
                rows.append(end - 1)
        inp = self._inputs(batch, blocks, rows)
        for seq, n in batch:
            seq.num_cached += n
        logits = self.execute(inp)
        if not sample_seqs:
            return []
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
            inp = self._inputs([(seq, len(seq))], blocks, list(range(len(seq))))
            inp.decode_only = False
            return self.execute(inp)
        finally:
            blocks.release(seq)
