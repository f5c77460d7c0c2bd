"""The generation engine: requests in, tokens and text out, one scheduler step at a time."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from quantrt.engine.block_manager import BlockManager
from quantrt.engine.model_runner import ModelRunner, kv_bytes_per_token
from quantrt.engine.scheduler import Scheduler
from quantrt.engine.sequence import FinishReason, SamplingParams, Sequence
from quantrt.errors import ConfigError
from quantrt.loader import LoadedModel

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_memory: int | None = None      # bytes; None: 1 GiB on CPU, 40% of free on GPU

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ConfigError("kv_cache_memory must be a positive number of bytes")


@dataclass
class StepOutput:
    seq: Sequence
    new_text: str
    new_token: int | None
    finished: bool


class LLMEngine:
    def __init__(self, lm: LoadedModel, config: EngineConfig = EngineConfig()) -> None:
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.config = config
        self.max_model_len = min(config.max_model_len or lm.config.max_position_embeddings,
                                 lm.config.max_position_embeddings)
        per_token = kv_bytes_per_token(lm, lm.dtype)
        budget = config.kv_cache_memory
        if budget is None:
            if lm.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(lm.device)
                budget = int(free * 0.4)
            else:
                budget = DEFAULT_CPU_KV_BYTES
        num_blocks = budget // (per_token * config.block_size)
        if num_blocks < 1:
            raise ConfigError(f"kv_cache_memory of {budget} bytes holds no block of "
                              f"{config.block_size} tokens ({per_token} bytes per token)")
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.runner = ModelRunner(lm, num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.streams: dict[int, object] = {}
        self._counter = itertools.count()

    # -- requests -----------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> Sequence:
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens; the context limit is "
                              f"{self.max_model_len}")
        if -(-(len(prompt_ids) + 1) // self.blocks.block_size) > self.blocks.num_blocks:
            raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) does not fit in the KV cache "
                              f"({self.blocks.num_blocks * self.blocks.block_size} tokens)",
                              hint="raise kv_cache_memory")
        vocab = self.lm.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        seq = Sequence(list(prompt_ids), params, request_id or str(next(self._counter)))
        self.streams[seq.seq_id] = self.tokenizer.stream()
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if not seq.finished:
            seq.finish_reason = FinishReason.ABORT
            self._finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping -----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress with work pending")
            return []
        sampled = self.runner.step(batch, self.blocks)
        outputs = []
        for seq, _ in batch:
            tok = sampled.get(seq.seq_id)
            if tok is None:
                continue
            text = self._append(seq, tok)
            outputs.append(StepOutput(seq, text, tok, seq.finished))
        return outputs

    def _append(self, seq: Sequence, tok: int) -> str:
        p = seq.params
        seq.output_ids.append(tok)
        stop_tok = (not p.ignore_eos and tok in self.tokenizer.eos_token_ids) or tok in p.stop_token_ids
        piece = "" if stop_tok else self.streams[seq.seq_id].add(tok)
        before = len(seq.output_text)
        seq.output_text += piece
        if stop_tok:
            seq.finish_reason = FinishReason.STOP
        elif p.stop and self._hit_stop(seq, before, len(piece)):
            seq.finish_reason = FinishReason.STOP
        elif len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.output_text += self.streams[seq.seq_id].flush()
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            self._finish(seq)
            return seq.output_text[before:]
        # Hold back text that could be the start of a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        emitted = getattr(seq, "_emitted", 0)
        safe = max(emitted, len(seq.output_text) - hold)
        seq._emitted = safe
        return seq.output_text[emitted:safe]

    def _hit_stop(self, seq: Sequence, before: int, added: int) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        lo = max(0, before - longest + 1)
        hits = [i for s in seq.params.stop if (i := seq.output_text.find(s, lo)) >= 0]
        if not hits:
            return False
        seq.output_text = seq.output_text[:min(hits)]
        return True

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.runner.sampler.forget(seq)
        self.streams.pop(seq.seq_id, None)

    # -- conveniences -------------------------------------------------------------------
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Generate for one prompt alone, yielding text as it becomes final."""
        seq = self.add_request(prompt_ids, params)
        emitted = 0
        while not seq.finished:
            for out in self.step():
                if out.seq is seq:
                    emitted += len(out.new_text)
                    yield out.new_text
        if emitted < len(seq.output_text):
            yield seq.output_text[emitted:]

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[Sequence]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_unfinished():
            self.step()
        return seqs
