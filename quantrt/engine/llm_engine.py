"""The generation engine: requests in, tokens and text out, one scheduler step at a time.

Single-threaded by design: whoever owns the engine calls ``add_request``/``abort``/``step``
from one thread (the async engine serialises them onto its own loop).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from quantrt.engine.block_manager import BlockManager, KVUsage
from quantrt.engine.kv_dtype import check_kv_cache_dtype, kv_cache_torch_dtype
from quantrt.engine.model_runner import ModelRunner, PendingStep, kv_bytes_per_token
from quantrt.engine.outputs import TokenLogprob
from quantrt.engine.scheduler import Scheduler
from quantrt.engine.sequence import FinishReason, SamplingParams, Sequence, make_group
from quantrt.errors import ConfigError
from quantrt.loader import LoadedModel

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_memory: int | None = None      # bytes; None: 1 GiB on CPU, see below on GPU
    # GPU only: the fraction of the device's memory this process may hold; the KV cache gets
    # what the weights and the profiled peak activations leave (engine/memory_profile.py).
    # None: 0.9 when kv_cache_memory is not given.
    gpu_memory_utilization: float | None = None
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True                # decode steps replay captured graphs on CUDA
    tensor_parallel_size: int = 1           # ranks (processes, one GPU each) per model
    # Launch the next decode step before reading this one's tokens, so the host's step work
    # runs while the device computes.  None: on for CUDA with one process.
    overlap_steps: bool | None = None
    # "auto" (the model's dtype), "bfloat16", "float16", or FP8 ("fp8" = "fp8_e4m3", "fp8_e5m2"):
    # half the bytes per token of a 16-bit cache, so twice the tokens (engine/kv_dtype.py)
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "kv_cache_memory", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is None and name in ("max_model_len", "kv_cache_memory"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        util = self.gpu_memory_utilization
        if util is not None:
            if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
                raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
            if self.kv_cache_memory is not None:
                raise ConfigError("give kv_cache_memory or gpu_memory_utilization, not both")
        for name in ("enable_prefix_caching", "cuda_graphs", "overlap_steps"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "overlap_steps"):
                raise ConfigError(f"{name} must be True or False")
        check_kv_cache_dtype(self.kv_cache_dtype)

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown engine option {unknown[0]!r}",
                              hint="engine options are " + ", ".join(sorted(known)))
        return cls(**options)


@dataclass
class StepOutput:
    seq: Sequence
    new_text: str            # text released by this step (stop-string safe)
    new_token: int | None
    finished: bool
    logprob: TokenLogprob | None = None


DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def model_len_limit(lm: LoadedModel, config: EngineConfig) -> int:
    """The longest sequence the engine may hold: ``max_model_len``, within the model's."""
    limit = lm.config.max_position_embeddings
    return min(config.max_model_len or limit, limit)


def kv_memory(lm: LoadedModel, config: EngineConfig) -> tuple[int, int]:
    """(KV-cache budget in bytes, KV bytes per token) of this process: ``kv_cache_memory``;
    else on a GPU what ``gpu_memory_utilization`` leaves after profiling steps
    (``memory_profile``), on the CPU 1 GiB.  Under tensor parallelism every rank runs this
    at once (the profiling forwards hold collectives) and the cache is sized so that each
    rank's part fits."""
    per_token = kv_bytes_per_token(lm, kv_cache_torch_dtype(config.kv_cache_dtype, lm.dtype))
    budget, util = config.kv_cache_memory, config.gpu_memory_utilization
    if budget is not None:
        return budget, per_token
    if lm.device.type != "cuda":
        if util is not None:
            raise ConfigError("gpu_memory_utilization applies to a CUDA device",
                              hint="on the CPU, size the KV cache with kv_cache_memory")
        return DEFAULT_CPU_KV_BYTES, per_token
    from quantrt.engine.memory_profile import utilization_budget

    max_len = model_len_limit(lm, config)
    budget = utilization_budget(lm, DEFAULT_GPU_MEMORY_UTILIZATION if util is None else util,
                                config.max_num_seqs, config.max_num_batched_tokens,
                                config.block_size, config.cuda_graphs, max_len)
    # no more than every sequence at full length can use (a small model on a large GPU
    # would otherwise get millions of blocks, and a block table as long)
    blocks = config.max_num_seqs * -(-max_len // config.block_size)
    return min(budget, blocks * config.block_size * per_token), per_token


class LLMEngine:
    """``executor``: a :class:`~quantrt.parallel.executor.TPExecutor` when ``lm`` is rank 0's
    part of a tensor-parallel model (see :func:`quantrt.parallel.launch.load_parallel`)."""

    def __init__(self, lm: LoadedModel, config: EngineConfig = EngineConfig(),
                 executor: Any = None) -> None:
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.config = config
        self.executor = executor
        if executor is not None:   # every rank's cache must hold the same blocks
            executor.call("memory", config)
        mine = kv_memory(lm, config)
        reports = [mine] if executor is None else executor.gather(mine)
        num_blocks = min(budget // (per_token * config.block_size) for budget, per_token in reports)
        if num_blocks < 1:
            budget, per_token = mine
            raise ConfigError(f"kv_cache_memory of {budget} bytes holds no block of "
                              f"{config.block_size} tokens ({per_token} bytes per token)")
        self.model_len_limit = model_len_limit(lm, config)
        # The last token of a sequence is sampled, never computed: a cache of C tokens
        # serves sequences of C + 1, and a sequence running alone always fits.
        self.max_model_len = min(self.model_len_limit, num_blocks * config.block_size + 1)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        runner_args = ((num_blocks, config.block_size),
                       dict(max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                            cuda_graphs=config.cuda_graphs,
                            kv_dtype=kv_cache_torch_dtype(config.kv_cache_dtype, lm.dtype)))
        if executor is not None:   # the workers build theirs (and capture graphs) in step
            executor.call("init_runner", *runner_args)
        self.runner = ModelRunner(lm, *runner_args[0], **runner_args[1], executor=executor)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        overlap = config.overlap_steps
        if overlap is None:
            overlap = lm.device.type == "cuda" and executor is None
        elif overlap and executor is not None:
            raise ConfigError("overlap_steps is not available with tensor parallelism")
        self.overlap = overlap
        self._pending: PendingStep | None = None   # launched, tokens not read yet
        self.streams: dict[int, Any] = {}
        self.requests: dict[str, list[Sequence]] = {}    # unfinished requests by id
        self._ids = itertools.count()
        self._arrivals = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do for one process)."""
        if self.executor is not None:
            self.executor.shutdown()

    # -- requests -----------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams,
                      request_id: str | None = None) -> None:
        """Raise ConfigError for a request the engine would refuse; changes nothing."""
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"expected SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise ConfigError("a token-id prompt must be a list of integers")
        if len(prompt_ids) >= self.model_len_limit:
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens; the context limit is "
                              f"{self.model_len_limit}")
        if len(prompt_ids) >= self.max_model_len:
            raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) does not fit in the KV cache "
                              f"({self.blocks.num_blocks * self.blocks.block_size} tokens)",
                              hint="raise kv_cache_memory")
        vocab = self.lm.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if params.n > self.config.max_num_seqs:
            raise ConfigError(f"n={params.n} completions exceed max_num_seqs="
                              f"{self.config.max_num_seqs}", hint="raise max_num_seqs or lower n")
        if request_id is not None and request_id in self.requests:
            raise ConfigError(f"request id {request_id!r} is already running")

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, stream_text: bool = True) -> Sequence:
        """Queue a request; returns its first completion (``.group`` holds all ``n``).

        ``stream_text=False`` (offline use): without stop strings the text is decoded once
        when the sequence finishes instead of token by token (a tokenizer call per token
        per sequence is a large part of a big batch's step time)."""
        self.check_request(prompt_ids, params, request_id)
        while request_id is None or request_id in self.requests:
            request_id = str(next(self._ids))
        group = make_group(prompt_ids, params, request_id, next(self._arrivals))
        lazy = not stream_text and not params.stop
        for seq in group:
            self.streams[seq.seq_id] = None if lazy else self.tokenizer.stream()
        self.requests[request_id] = group
        self.scheduler.add(group[0])   # the others are forked from it after its prefill
        return group[0]

    def abort(self, request: str | Sequence) -> bool:
        """Stop a request (by id or by any of its sequences) and free its blocks.
        False when it is unknown or already finished."""
        rid = request.request_id if isinstance(request, Sequence) else request
        group = self.requests.get(rid)
        if group is None:
            return False
        for seq in group:
            if not seq.finished:
                seq.drop_pending()
                seq.finish_reason = FinishReason.ABORT
                if seq.seq_id in self.streams and self.streams[seq.seq_id] is None:
                    seq.output_text = self.tokenizer.decode(seq.output_ids)
                self._finish(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._pending is not None

    def kv_usage(self) -> KVUsage:
        """Cache slots in use vs slots holding K/V right now (fragmentation of the last block)."""
        return self.blocks.usage(self.scheduler.running)

    # -- stepping -----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one step; returns the tokens that became known.  With ``overlap_steps`` a
        decode step is launched before the previous step's tokens are read, so those
        come back one call later (its inputs come from the device's copy of them)."""
        pending, self._pending = self._pending, None
        if pending is not None and not self._can_overlap(pending):
            return self._read(pending)
        batch = self.scheduler.schedule()
        if not batch:
            if pending is not None:
                return self._read(pending)
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress with work pending")
            return []
        if pending is not None and any(n != 1 or seq.pending != 1 for seq, n in batch):
            raise RuntimeError("an overlapped step must decode the unread tokens")
        defer = self.overlap and all(
            self.runner.sampler.deferrable(seq) and not seq.fork_targets() for seq, _ in batch)
        if not defer and pending is None:   # the plain path: one step, read at once
            sampled = self.runner.step(batch, self.blocks)
            self._commit(batch)
            return self._accept_all(sampled)
        launched = self.runner.launch(batch, self.blocks, prev=pending, defer=defer)
        outputs = self._read(pending) if pending is not None else []
        self._commit(batch)
        if defer:
            for seq in launched.seqs:
                if seq.finished:   # ended on the token just read: this step's is void
                    continue
                seq.output_ids.append(-1)   # a placeholder, so the scheduler sees its length
                seq.pending += 1
                seq.draining = (len(seq.output_ids) >= seq.params.max_tokens
                                or len(seq) >= self.max_model_len)
            self._pending = launched
        else:
            outputs += self._accept_all(launched.result())
        return outputs

    def _can_overlap(self, pending: PendingStep) -> bool:
        """Whether the next step can be launched before ``pending`` is read: it must be a
        decode of exactly the sequences whose tokens are unread, which the scheduler will
        choose without preempting (blocks suffice) or admitting (no seat is free)."""
        running = [s for s in self.scheduler.running if not s.draining]
        if not running or any(s.pending != 1 for s in running) \
                or len(running) > self.config.max_num_batched_tokens:
            return False
        waiting = self.scheduler.waiting
        if waiting and self.scheduler.seats_taken() + waiting[0].seats <= self.config.max_num_seqs:
            return False
        need = sum(self.blocks.blocks_needed(s, 1) for s in running)
        return need <= self.blocks.num_free

    def _read(self, pending: PendingStep) -> list[StepOutput]:
        """Put ``pending``'s tokens in place of their placeholders and act on them."""
        outputs = []
        for seq, tok, lp in pending.result():
            if seq.finished:   # ended on an earlier token (or aborted): this one is void
                continue
            k = len(seq.output_ids) - seq.pending
            seq.output_ids[k] = tok
            seq.pending -= 1
            text = self._accept(seq, k, tok, lp)
            outputs.append(StepOutput(seq, text, tok, seq.finished, lp))
        return outputs

    def _commit(self, batch: list[tuple[Sequence, int]]) -> None:
        # name the blocks this step filled; called once the tokens they hold are all known
        for seq, n in batch:
            if not seq.finished:
                self.blocks.commit(seq, seq.num_cached - n)

    def _accept_all(self, sampled: list[tuple[Sequence, int, TokenLogprob | None]]
                    ) -> list[StepOutput]:
        # Fork before appending: the parent may finish on this very token and free its blocks.
        for seq, _, _ in sampled:
            if seq.awaiting_fork:
                self.blocks.fork(seq.group[0], seq, len(seq.prompt_ids))
                seq.awaiting_fork = False
                self.scheduler.add_forked(seq)
        outputs = []
        for seq, tok, lp in sampled:
            seq.output_ids.append(tok)
            text = self._accept(seq, len(seq.output_ids) - 1, tok, lp)
            outputs.append(StepOutput(seq, text, tok, seq.finished, lp))
        return outputs

    def _accept(self, seq: Sequence, k: int, tok: int, lp: TokenLogprob | None) -> str:
        """Act on output token ``k`` of ``seq`` (already in output_ids): logprobs, text,
        stop conditions.  Returns the text that became final."""
        p = seq.params
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp.logprob
        stop_tok = (not p.ignore_eos and tok in self.tokenizer.eos_token_ids) or tok in p.stop_token_ids
        stream = self.streams.get(seq.seq_id)
        piece = "" if stop_tok or stream is None else stream.add(tok)
        before = len(seq.output_text)
        seq.output_text += piece
        if stop_tok or p.stop and self._hit_stop(seq, before):
            seq.finish_reason = FinishReason.STOP
        elif k + 1 >= p.max_tokens or len(seq.prompt_ids) + k + 1 >= self.max_model_len:
            if stream is not None:
                seq.output_text += stream.flush()
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            seq.drop_pending()   # tokens sampled after the last one are void
        if stream is None and seq.finish_reason is not None:
            seq.output_text = self.tokenizer.decode(seq.output_ids[:-1] if stop_tok
                                                    else seq.output_ids)
        emitted = seq.emitted
        if seq.finish_reason is not None:
            self._finish(seq)
            seq.emitted = len(seq.output_text)
        else:
            # Hold back text that could be the start of a stop string.
            hold = max((len(s) - 1 for s in p.stop), default=0)
            seq.emitted = max(emitted, len(seq.output_text) - hold)
        return seq.output_text[emitted:seq.emitted]

    def _hit_stop(self, seq: Sequence, before: int) -> bool:
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
        if all(s.finished for s in seq.group):
            self.requests.pop(seq.request_id, None)

    # -- conveniences -------------------------------------------------------------------
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Generate for one prompt, yielding text as it becomes final."""
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
        """Run to completion; returns the first completion of each prompt (``.group``: all)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ConfigError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_unfinished():
            self.step()
        return seqs
