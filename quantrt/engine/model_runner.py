"""The only part of the engine that touches the device: owns the KV cache, turns a
scheduled batch into model inputs (slot mapping, block tables), runs the model, samples."""
from __future__ import annotations

import sys
from array import array
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
    # ids are rows of the previous step's sampled-token tensor (still on the device)
    ids_from_prev: bool = False


class PendingStep:
    """A launched step's sampled tokens: on the device, with a non-blocking copy to the host
    under way when the step was deferred; ``result`` waits for them."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor | None,
                 logprobs: list[TokenLogprob | None], defer: bool) -> None:
        self.seqs = seqs
        self.tokens = tokens              # int64 [len(seqs)] on the device
        self.logprobs = logprobs
        self.row = {seq: i for i, seq in enumerate(seqs)}
        self._host: torch.Tensor | list[int] | None = None
        self._event = None
        if tokens is None:
            self._host = []
        elif defer and tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif not defer:
            self._host = tokens.tolist()

    def result(self) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        if self._event is not None:
            self._event.synchronize()
            self._host, self._event = self._host.tolist(), None
        elif self._host is None:   # deferred on the CPU: the values are there already
            self._host = self.tokens.tolist()
        return list(zip(self.seqs, self._host, self.logprobs))


def kv_heads(model: torch.nn.Module) -> int:
    """KV heads this process caches: all of them, or its rank's under tensor parallelism."""
    from quantrt.parallel.shard import local_kv_heads

    return local_kv_heads(model)


def kv_bytes_per_token(lm: LoadedModel, kv_dtype: torch.dtype) -> int:
    cfg = lm.config
    return 2 * cfg.num_layers * kv_heads(lm.model) * cfg.head_dim * torch.finfo(kv_dtype).bits // 8


def _tokens(seq: Sequence, start: int, n: int) -> list[int]:
    """Tokens ``start .. start+n-1`` of ``seq`` without building its whole id list (a copy of
    every token of every sequence in every step, otherwise)."""
    plen = len(seq.prompt_ids)
    if start >= plen:
        return seq.output_ids[start - plen:start - plen + n]
    if start + n <= plen:
        return seq.prompt_ids[start:start + n]
    return seq.prompt_ids[start:] + seq.output_ids[:start + n - plen]


class ModelRunner:
    """``executor``: under tensor parallelism (rank 0 only), every step's inputs are
    broadcast to the other ranks before this rank runs its part.  ``kv_dtype``: the KV
    caches' element type (default: the model's dtype; FP8 see ``engine/kv_dtype.py``)."""

    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, *,
                 max_num_seqs: int = 64, max_model_len: int | None = None,
                 cuda_graphs: bool = True, kv_dtype: torch.dtype | None = None,
                 executor: Any = None) -> None:
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
        self.kv_dtype = kv_dtype or lm.dtype
        self.kv_caches = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
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
            ids += _tokens(seq, start, n)
            pos += range(start, start + n)
            slots += blocks.slots(seq, start, n)
            ctx.append(start + n)
            qlens.append(n)
        width = max(len(seq.block_table) for seq, _ in batch)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in batch]
        decode = all(n == 1 and seq.num_cached + 1 == len(seq) for seq, n in batch)
        return StepInputs(ids, pos, slots, tables, ctx, qlens, rows, decode)

    def _tensors(self, inp: StepInputs
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
        """(ids, positions, metadata, rows); rows None: every row (a decode step).  All of it
        travels to the device in one copy from page-locked memory: separate small copies
        cost microseconds of host time each, at every step."""
        starts = [0]
        for n in inp.qlens:
            starts.append(starts[-1] + n)
        flat = inp.ids + inp.pos + inp.slots + inp.rows + inp.ctx + starts
        for row in inp.tables:
            flat += row
        # via array: about a third of torch.tensor's time for a list of Python ints
        host = torch.frombuffer(array("q", flat), dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory().to(self.device, non_blocking=True)
        elif host.device != self.device:
            host = host.to(self.device)
        tokens, num_rows, bsz = len(inp.ids), len(inp.rows), len(inp.ctx)
        small = host[3 * tokens + num_rows:].to(torch.int32)  # ctx, starts, tables: one cast
        meta = AttentionMetadata(
            slot_mapping=host[2 * tokens:3 * tokens],
            block_tables=small[2 * bsz + 1:].view(bsz, -1),
            context_lens=small[:bsz], query_start_loc=small[bsz:2 * bsz + 1],
            context_lens_host=inp.ctx, query_lens_host=inp.qlens)
        # rows are increasing positions < tokens: as many as tokens means all of them
        rows = None if num_rows == tokens else host[3 * tokens:3 * tokens + num_rows]
        return host[:tokens], host[tokens:2 * tokens], meta, rows

    def execute(self, inp: StepInputs, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``inp.rows`` (every rank of a tensor-parallel model runs this); ``prev``:
        the previous step's sampled tokens when ``inp.ids_from_prev``."""
        if self.executor is not None:
            self.executor.call("execute", inp)
        return self.run_local(inp, prev)

    @torch.inference_mode()
    def run_local(self, inp: StepInputs, prev: torch.Tensor | None = None) -> torch.Tensor:
        ids, pos, meta, rows = self._tensors(inp)
        if inp.ids_from_prev:
            ids = prev if ids.shape[0] == prev.shape[0] and inp.ids == list(range(len(inp.ids))) \
                else prev.index_select(0, ids)
        if self.graphs is not None and inp.decode_only \
                and self.graphs.fits(len(inp.ctx), meta.block_tables.shape[1]):
            logits = self.graphs.run(ids, pos, meta)  # one row per sequence
            return logits if rows is None else logits[rows]
        hidden = self.model(ids, pos, self.kv_caches, meta)
        return self.model.compute_logits(hidden if rows is None else hidden[rows])

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]], blocks: BlockManager
             ) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Run one step; returns (sequence, next token, its logprobs) for every sequence whose
        last token was computed, plus the completions forked from a prompt just prefilled
        (they sample their first token from the same logits row)."""
        return self.launch(batch, blocks).result()

    @torch.inference_mode()
    def launch(self, batch: list[tuple[Sequence, int]], blocks: BlockManager,
               prev: PendingStep | None = None, defer: bool = False) -> PendingStep:
        """Start one step.  ``prev``: the unread step whose tokens are the inputs of this
        one (every sequence of ``batch`` decodes the token ``prev`` sampled for it).
        ``defer``: leave this step's tokens on the device (a copy to the host is started);
        no sequence of the batch may want logprobs or penalties (``Sampler.deferrable``)."""
        rows, expand, sample_seqs, end = [], [], [], 0
        for seq, n in batch:
            end += n
            if seq.num_cached + n == len(seq):
                for s in [seq, *seq.fork_targets()]:
                    expand.append(len(rows))
                    sample_seqs.append(s)
                rows.append(end - 1)
        inp = self._inputs(batch, blocks, rows)
        if prev is not None:
            if self.executor is not None:
                raise RuntimeError("steps cannot overlap under tensor parallelism")
            inp.ids = [prev.row[seq] for seq, _ in batch]
            inp.ids_from_prev = True
        for seq, n in batch:
            seq.num_cached += n
        logits = self.execute(inp, None if prev is None else prev.tokens)
        if not sample_seqs:
            return PendingStep([], None, [], defer)
        if len(expand) > len(rows):
            logits = logits[expand]
        raw = logits.float()
        tokens = self.sampler.sample(raw, sample_seqs)
        logprobs = [None] * len(sample_seqs) if defer else \
            self.sampler.logprobs(raw, tokens, sample_seqs)
        return PendingStep(sample_seqs, tokens, logprobs, defer)

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
