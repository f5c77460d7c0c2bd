"""Prefill attention on the GPU: the Triton paged prefill kernel against the torch reference
(the per-sequence loop that CUDA prefill used before), side by side in one run.

Steps shaped like the engine's (``max_num_batched_tokens`` 2048, block size 16): a batch of
whole prompts of 128-1024 tokens packed up to the budget, a step of chunked prefill (a
2048-token chunk after 6144 cached tokens), and a mixed step (64 decode rows beside one
1024-token prompt, the decode rows on the decode kernel in both).  Head layouts of
Llama-3.2-1B (32 q / 8 kv heads, head dim 64) and Llama-3-8B (32 / 8, 128), bf16.  Times
are medians of CUDA-event-timed repeats after warm-up; `--tiles` also times other
(BLOCK_M, BLOCK_N) choices of the kernel.

    PYTHONPATH=. python scripts/bench_prefill_attention.py [--tiles 64,64 128,64 64,32]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant_kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from quantrt.models.attention import (AttentionMetadata, paged_attention,  # noqa: E402
                                      paged_attention_ref)

BLOCK = 16


def make_step(ctx: list[int], qlens: list[int], heads: int, kv_heads: int, dim: int):
    need = [-(-c // BLOCK) for c in ctx]
    nb = sum(need) + 1
    k = torch.randn(nb, BLOCK, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    order = torch.randperm(nb).tolist()
    width, tables = max(need), []
    for n in need:
        tables.append(order[:n] + [0] * (width - n))
        order = order[n:]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim, device="cuda", dtype=torch.bfloat16)
    i32 = dict(dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device="cuda"),
        block_tables=torch.tensor(tables, **i32), context_lens=torch.tensor(ctx, **i32),
        query_start_loc=torch.tensor(starts, **i32), context_lens_host=ctx,
        query_lens_host=qlens)
    return q, k, v, meta


def cuda_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def steps() -> dict[str, tuple[list[int], list[int]]]:
    rng = random.Random(0)
    prompts = []
    while sum(prompts) < 2048:
        prompts.append(rng.randint(128, 1024))
    prompts[-1] -= sum(prompts) - 2048
    dec_ctx = [rng.randint(128, 1500) for _ in range(64)]
    return {"prompts": (prompts, prompts), "chunk": ([8192], [2048]),
            "mixed": (dec_ctx + [1024], [1] * 64 + [1024])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", nargs="*", default=[], help="extra BLOCK_M,BLOCK_N choices")
    args = ap.parse_args()
    extra = [tuple(int(x) for x in t.split(",")) for t in args.tiles]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")
    print("shape | step | tokens | torch ref ms | triton ms | x" +
          "".join(f" | tiles {t} ms" for t in extra))
    for name, (h, hk, d) in {"1B": (32, 8, 64), "8B": (32, 8, 128)}.items():
        for step, (ctx, qlens) in steps().items():
            q, k, v, meta = make_step(ctx, qlens, h, hk, d)
            inputs = (q, k, v, meta, d ** -0.5)
            # the previous CUDA path: the torch loop (beside the decode kernel in a mixed step)
            ref = (_old_mixed(*inputs) if step == "mixed" else
                   partial(paged_attention_ref, *inputs))
            new = partial(paged_attention, *inputs)
            err = (new().float() - ref().float()).abs().max().item()
            t_ref, t_new = cuda_ms(ref), cuda_ms(new)
            cells = [f"{cuda_ms(partial(_tiled, *inputs, t)):.3f}" for t in extra] \
                if step != "mixed" else ["-"] * len(extra)
            print(f"{name} | {step} | {sum(qlens)} | {t_ref:.3f} | {t_new:.3f} | "
                  f"{t_ref / t_new:.1f}" + "".join(f" | {c}" for c in cells)
                  + f"   (max abs diff {err:.2e})")


def _tiled(q, k, v, meta, scale, tiles):
    return paged_prefill_attention(q, k, v, meta.block_tables, meta.context_lens,
                                   meta.query_start_loc, meta.max_query_len, scale, tiles=tiles)


def _old_mixed(q, k, v, meta, scale):
    """The mixed-step path before the prefill kernel, as a function of nothing: its split
    of the batch (and the reference's per-sequence plans) built once, as the engine built
    them once per step for all layers."""
    from quant_kernels.paged_attention import paged_decode_attention

    dec = [i for i, n in enumerate(meta.query_lens_host) if n == 1]
    pre = [i for i, n in enumerate(meta.query_lens_host) if n != 1]
    starts = meta.query_start_loc.tolist()
    d_rows = torch.tensor([starts[i] for i in dec], device="cuda")
    p_rows = torch.tensor([r for i in pre for r in range(starts[i], starts[i + 1])],
                          device="cuda")
    qlens = [meta.query_lens_host[i] for i in pre]
    p_starts = [0]
    for n in qlens:
        p_starts.append(p_starts[-1] + n)
    p_meta = AttentionMetadata(
        slot_mapping=meta.slot_mapping, block_tables=meta.block_tables[pre],
        context_lens=meta.context_lens[pre],
        query_start_loc=torch.tensor(p_starts, dtype=torch.int32, device="cuda"),
        context_lens_host=[meta.context_lens_host[i] for i in pre], query_lens_host=qlens)
    d_tables, d_lens = meta.block_tables[dec], meta.context_lens[dec]

    def run():
        out = torch.empty_like(q)
        out[d_rows] = paged_decode_attention(q[d_rows], k, v, d_tables, d_lens, scale)
        out[p_rows] = paged_attention_ref(q[p_rows], k, v, p_meta, scale)
        return out
    return run


if __name__ == "__main__":
    main()
