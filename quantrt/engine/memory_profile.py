"""KV-cache size on a GPU from ``gpu_memory_utilization``, after profiling forwards.

As vLLM means it: ``utilization x total`` GPU memory must hold everything this process
keeps (weights, CUDA context, what other processes use counts against it too), the peak
activations of the largest step the scheduler may build (``max_num_batched_tokens``
prefill tokens over up to ``max_num_seqs`` sequences, with their logits and the
sampler's sorted copies), the CUDA graphs' private pool (one decode step of
``max_num_seqs`` rows: the graphs share it, largest first) and a slack; the KV cache gets
the rest.  The peaks are measured, not modelled: a fused kernel's dense-weight transient
(dequantize + cuBLAS from ``triton_wq.DENSE_FROM_M`` rows on) is in them because the
profiling steps run the same layers.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from quantrt.errors import ConfigError

# cuBLAS workspaces, autotuning and timed kernel choices at M buckets first met after
# startup (their timing graphs and flush buffers), allocator fragmentation
SLACK_BYTES = 1 << 30


@dataclass(frozen=True)
class MemoryProfile:
    total: int           # device memory
    in_use: int          # not available to this process' allocator now
    prefill_peak: int    # activations of the largest mixed step, above what stays allocated
    decode_peak: int     # one decode step of max_num_seqs rows (the graph pool); 0: no graphs

    def kv_budget(self, utilization: float) -> int:
        return int(utilization * self.total) - self.in_use - self.prefill_peak \
            - self.decode_peak - SLACK_BYTES

    def explain(self, utilization: float) -> str:
        gib = 1 << 30
        return (f"{utilization:.0%} of {self.total / gib:.2f} GiB; in use "
                f"{self.in_use / gib:.2f} GiB (weights, CUDA context, other processes), "
                f"step activations {self.prefill_peak / gib:.2f} GiB, CUDA-graph pool "
                f"{self.decode_peak / gib:.2f} GiB, slack {SLACK_BYTES / gib:.2f} GiB")


def split_lengths(tokens: int, seqs: int, max_len: int) -> list[int]:
    """``tokens`` prompt tokens over ``min(seqs, tokens)`` sequences, as even as possible;
    none longer than ``max_len`` (a step the scheduler can build: fewer tokens when
    ``seqs * max_len`` is less)."""
    tokens = min(tokens, seqs * max_len)
    seqs = max(1, min(seqs, tokens))
    base, extra = divmod(tokens, seqs)
    return [base + (i < extra) for i in range(seqs)]


def profile_inputs(lengths: list[int], block_size: int, vocab: int):
    """StepInputs of fresh prompts of ``lengths`` tokens, each in its own blocks."""
    from quantrt.engine.model_runner import StepInputs

    ids, pos, slots, tables, rows = [], [], [], [], []
    block = 0
    for n in lengths:
        count = -(-n // block_size)
        tables.append(list(range(block, block + count)))
        slots += range(block * block_size, block * block_size + n)
        ids += [(7919 * (len(ids) + i)) % vocab for i in range(n)]   # any ids: shapes matter
        pos += range(n)
        rows.append(len(ids) - 1)
        block += count
    width = max(len(t) for t in tables)
    tables = [t + [0] * (width - len(t)) for t in tables]
    return StepInputs(ids, pos, slots, tables, list(lengths), list(lengths), rows,
                      all(n == 1 for n in lengths)), block


def step_peak(lm, lengths: list[int], block_size: int) -> int:
    """Peak bytes allocated by one eager step over fresh prompts of ``lengths`` (logits of
    each last token, then the sampler's softmax and sort), above what was allocated
    before it; its own scratch KV cache is not counted."""
    from quantrt.engine.model_runner import ModelRunner

    dev = lm.device
    inp, blocks = profile_inputs(lengths, block_size, lm.config.vocab_size)
    runner = ModelRunner(lm, blocks, block_size, max_num_seqs=len(lengths), cuda_graphs=False)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    with torch.inference_mode():
        logits = runner.run_local(inp)
        probs = logits.float().softmax(-1)
        torch.sort(probs, dim=-1, descending=True)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del runner, logits, probs
    torch.cuda.empty_cache()
    return peak


def profile(lm, max_num_seqs: int, max_num_batched_tokens: int, block_size: int,
            cuda_graphs: bool, max_len: int) -> MemoryProfile:
    """Run the profiling steps on ``lm``'s GPU (every tensor-parallel rank at once: the
    forwards hold collectives) and measure."""
    dev = lm.device
    torch.cuda.synchronize(dev)
    gc.collect()   # an engine dropped just before (reference cycles) must not count
    torch.cuda.empty_cache()
    prefill = step_peak(lm, split_lengths(max_num_batched_tokens, max_num_seqs, max_len), block_size)
    decode = step_peak(lm, [1] * max_num_seqs, block_size) if cuda_graphs else 0
    free, total = torch.cuda.mem_get_info(dev)
    # memory our allocator holds but does not use is free for the KV cache
    idle = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return MemoryProfile(total=total, in_use=total - free - idle, prefill_peak=prefill,
                         decode_peak=decode)


def utilization_budget(lm, utilization: float, max_num_seqs: int, max_num_batched_tokens: int,
                       block_size: int, cuda_graphs: bool, max_len: int) -> int:
    """KV-cache bytes for ``utilization`` of ``lm``'s GPU; a clear error when none is left."""
    prof = profile(lm, max_num_seqs, max_num_batched_tokens, block_size, cuda_graphs, max_len)
    budget = prof.kv_budget(utilization)
    if budget <= 0:
        raise ConfigError(f"gpu_memory_utilization {utilization} leaves no room for the KV "
                          f"cache: {prof.explain(utilization)}",
                          hint="raise gpu_memory_utilization, lower max_num_batched_tokens or "
                               "max_num_seqs, or set kv_cache_memory")
    return budget
