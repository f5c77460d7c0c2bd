"""The model runner's step inputs, on a tiny random model: every step of a run with chunked
prefill, decode, preemption (recompute of prompt + output) and n > 1 gets exactly the ids,
positions, cache slots, block tables, lengths and sampled rows that its batch implies, and
they are views of one host buffer (one host-to-device copy on CUDA), and a greedy step makes
no other tensor from host data."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from quantrt.engine.sequence import SamplingParams


class _HostTensors(TorchDispatchMode):
    """Counts tensors made from host data (torch.tensor(list), indexing with a list)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.startswith("lift_fresh")
        return func(*args, **(kwargs or {}))


def _expected(batch, block_size):
    ids, pos, slots, rows, tables, start_loc = [], [], [], [], [], [0]
    width = max(len(s.block_table) for s, _ in batch)
    for seq, n in batch:
        c = seq.num_cached
        ids += seq.all_ids[c:c + n]
        pos += list(range(c, c + n))
        slots += [seq.block_table[p // block_size] * block_size + p % block_size
                  for p in range(c, c + n)]
        start_loc.append(start_loc[-1] + n)
        if c + n == len(seq):
            rows.append(start_loc[-1] - 1)
        tables.append(seq.block_table + [0] * (width - len(seq.block_table)))
    return ids, pos, slots, rows, tables, start_loc


def test_step_inputs_match_the_batch(loaded):
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine

    per_token = 2 * loaded.config.num_layers * loaded.config.num_kv_heads \
        * loaded.config.head_dim * 4
    # 23 blocks of 4 tokens for 7 requests that grow to ~40 tokens: preemption happens
    eng = LLMEngine(loaded, EngineConfig(kv_cache_memory=per_token * 92, block_size=4,
                                         max_num_batched_tokens=17))
    runner, tensors, step = eng.runner, eng.runner._tensors, eng.runner.step
    kinds, host_tensors, current = set(), [], {}

    def checked_tensors(inp):
        batch = current["batch"]
        ids, pos, meta, rows = tensors(inp)
        want_ids, want_pos, want_slots, want_rows, want_tables, want_starts, want_ctx = \
            current["want"]
        assert ids.tolist() == want_ids and pos.tolist() == want_pos
        assert meta.slot_mapping.tolist() == want_slots
        assert meta.block_tables.dtype == torch.int32
        assert meta.block_tables.tolist() == want_tables
        assert meta.context_lens.tolist() == want_ctx
        assert meta.query_start_loc.tolist() == want_starts
        # one host buffer: int64 inputs are views of it, int32 ones views of its one cast
        base = {t.untyped_storage().data_ptr() for t in (ids, pos, meta.slot_mapping)
                + (() if rows is None else (rows,))}
        cast = {t.untyped_storage().data_ptr() for t in (meta.block_tables,
                                                          meta.context_lens,
                                                          meta.query_start_loc)}
        assert len(base) == 1 and len(cast) == 1
        if rows is None:  # decode: every row is sampled
            assert want_rows == list(range(len(want_ids))) == list(range(len(batch)))
            kinds.add("decode")
        else:
            assert rows.tolist() == want_rows
            kinds.add("mixed" if any(n == 1 for _, n in batch) else "prefill")
        if current["recompute"]:
            kinds.add("recompute")  # a preempted sequence's prompt + output in one chunk
        return ids, pos, meta, rows

    def counted_step(batch, blocks):
        # expectations from the sequences' state before the step moves them on
        current["batch"] = batch
        current["want"] = (*_expected(batch, runner.block_size),
                           [s.num_cached + n for s, n in batch])
        current["recompute"] = any(s.num_cached < len(s.prompt_ids) < s.num_cached + n
                                   for s, n in batch)
        with _HostTensors() as mode:
            out = step(batch, blocks)
        if all(s.params.greedy for s, _ in batch):  # sampling draws build their own tensors
            host_tensors.append(mode.count)
        return out

    runner._tensors, runner.step = checked_tensors, counted_step
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 17, 23, 9, 30, 5)]
    outs = eng.generate(prompts, SamplingParams(max_tokens=14, temperature=0, ignore_eos=True))
    outs += eng.generate([prompts[2]], SamplingParams(max_tokens=6, n=3, temperature=0.8,
                                                      seed=1, ignore_eos=True))
    assert all(len(o.output_ids) in (6, 14) for o in outs)
    assert eng.scheduler.num_preemptions > 0
    assert kinds >= {"prefill", "mixed", "decode", "recompute"}
    # no other tensor from host lists (e.g. indexing with a list of rows) in a greedy step
    assert host_tensors and not any(host_tensors), sorted(set(host_tensors))
