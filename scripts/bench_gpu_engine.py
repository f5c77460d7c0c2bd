"""GPU engine benchmark, side by side with HF transformers in one run (issue 5's table).

For each model (random-init Llama at real shapes, scripts/make_random_checkpoint.py) in bf16
and AWQ 4-bit:

  single   one greedy stream, 32-token prompt, --single-tokens new tokens (EOS ignored):
           new tokens / wall time of the whole generate call
  offline  --requests requests, prompt lengths uniform in [128, 1024] and output lengths
           uniform in [64, 512] (seeded): generated tokens / wall time
  memory   torch.cuda.max_memory_allocated over the model's runs

HF baseline: transformers' generate() on the bf16 checkpoint (greedy, ``min_new_tokens`` =
``max_new_tokens`` so it runs the same number of steps).  transformers needs AutoAWQ for AWQ
checkpoints, which is not installable here, so the AWQ rows are compared with HF bf16.
HF offline throughput is measured on the first --hf-requests requests in left-padded batches
of --hf-batch (every request generates its own output length; padding is not counted).

    PYTHONPATH=. python scripts/bench_gpu_engine.py --shapes llama-3.2-1b --out DIR
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_random_checkpoint as mrc  # noqa: E402


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(300, vocab) for _ in range(rng.randint(128, 1024))],
             rng.randint(64, 512)) for _ in range(n)]


def step_stats(engine) -> dict:
    """Wrap ``engine.step`` to sum wall time per kind of step: decode-only steps by batch
    size (buckets of 64) and steps holding prefill tokens (with their token count)."""
    stats: dict = {}
    schedule, step = engine.scheduler.schedule, engine.step
    last: dict = {}

    def scheduled():
        batch = schedule()
        last["batch"] = batch
        return batch

    def timed():
        last["batch"] = []
        t = time.perf_counter()
        out = step()
        dt = time.perf_counter() - t
        batch = last["batch"]
        if not batch:
            kind = "read-only"
        elif all(n == 1 for _, n in batch):
            kind = f"decode<= {-(-len(batch) // 64) * 64}"
        else:
            kind = "with-prefill"
        row = stats.setdefault(kind, dict(steps=0, s=0.0, tokens=0))
        row["steps"] += 1
        row["s"] = round(row["s"] + dt, 4)
        row["tokens"] += sum(n for _, n in batch)
        return out

    engine.scheduler.schedule, engine.step = scheduled, timed
    stats["_restore"] = step
    return stats


def bench_ours(path: Path, args, reqs, max_num_seqs: int, max_batched_tokens: int,
               kv_cache_dtype: str = "auto") -> dict:
    from quantrt import LLM, SamplingParams

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    llm = LLM(str(path), device="cuda", max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_batched_tokens, enable_prefix_caching=False,
              cuda_graphs=not args.eager, overlap_steps=not args.no_overlap,
              gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=kv_cache_dtype)
    load_s = time.perf_counter() - t0
    kv_tokens = llm.engine.blocks.num_blocks * llm.engine.blocks.block_size
    prompt = list(range(300, 332))
    sp = SamplingParams(max_tokens=args.single_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    t = time.perf_counter()
    out = llm.generate([prompt], sp)
    single = len(out[0].outputs[0].token_ids) / (time.perf_counter() - t)
    # the same stream reading every step's tokens at once (no overlapped steps), same engine
    llm.engine.overlap = False
    t = time.perf_counter()
    out = llm.generate([prompt], sp)
    single_plain = len(out[0].outputs[0].token_ids) / (time.perf_counter() - t)
    llm.engine.overlap = not args.no_overlap
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in reqs]
    stats = step_stats(llm.engine)
    t = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params)
    dt = time.perf_counter() - t
    llm.engine.step = stats.pop("_restore")
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    res = dict(max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
               kv_cache_dtype=kv_cache_dtype,
               kv_tokens=kv_tokens, preemptions=llm.engine.scheduler.num_preemptions,
               load_s=round(load_s, 1), single_tok_s=round(single, 1),
               single_plain_tok_s=round(single_plain, 1),
               offline_tok_s=round(gen / dt, 1), offline_s=round(dt, 1), generated=gen,
               offline_steps=stats,
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del llm, outs
    torch.cuda.empty_cache()
    return res


@torch.inference_mode()
def bench_hf(path: Path, args, reqs) -> dict:
    from transformers import AutoModelForCausalLM

    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()
    prompt = torch.arange(300, 332, device="cuda")[None]

    def gen(ids, mask, n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
    gen(prompt, torch.ones_like(prompt), 4)
    torch.cuda.synchronize()
    t = time.perf_counter()
    gen(prompt, torch.ones_like(prompt), args.hf_single_tokens)
    torch.cuda.synchronize()
    single = args.hf_single_tokens / (time.perf_counter() - t)
    sub = reqs[:args.hf_requests]
    total, t = 0, time.perf_counter()
    for i in range(0, len(sub), args.hf_batch):
        batch = sub[i:i + args.hf_batch]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen(ids.cuda(), mask.cuda(), max(m for _, m in batch))
        total += sum(m for _, m in batch)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    res = dict(single_tok_s=round(single, 1), offline_tok_s=round(total / dt, 1),
               offline_s=round(dt, 1), offline_requests=len(sub),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del model
    torch.cuda.empty_cache()
    return res


def checkpoint(work: Path, shape: str, fmt: str) -> Path:
    """The random-init checkpoint of ``shape`` in ``fmt``, made unless it exists."""
    path = work / f"{shape}-{fmt}"
    if not (path / "config.json").exists():
        t = time.perf_counter()
        mrc.make(shape, fmt, path)
        print(f"made {path} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    ap.add_argument("--formats", default="bf16,awq")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qrt_bench_ckpt"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--single-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", default="512",
                    help="comma list: one run of ours per (seqs, tokens) pair")
    ap.add_argument("--max-batched-tokens", default="8192", help="comma list")
    ap.add_argument("--kv-cache-dtype", default="auto", help="comma list (auto, fp8, ...)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="default: the engine's (0.9)")
    ap.add_argument("--hf-requests", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--hf-single-tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (for comparison)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="read every step's tokens before the next step (for comparison)")
    args = ap.parse_args()
    import transformers
    import triton

    rows = []
    for shape in args.shapes.split(","):
        vocab = mrc.SHAPES[shape]["vocab_size"]
        reqs = workload(args.requests, vocab)
        hf = None
        if not args.no_hf:  # HF runs the bf16 checkpoint whatever formats we run
            hf = bench_hf(checkpoint(args.work, shape, "bf16"), args, reqs)
            print(shape, "bf16", "hf", hf, flush=True)
        for fmt in args.formats.split(","):
            for seqs in (int(v) for v in args.max_num_seqs.split(",")):
                for tokens in (int(v) for v in args.max_batched_tokens.split(",")):
                    for kv in args.kv_cache_dtype.split(","):
                        ours = bench_ours(checkpoint(args.work, shape, fmt), args, reqs, seqs,
                                          tokens, kv)
                        print(shape, fmt, "ours", ours, flush=True)
                        rows.append(dict(shape=shape, format=fmt, ours=ours, hf_bf16=hf))
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, transformers=transformers.__version__,
                  args={k: str(v) for k, v in vars(args).items()}, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_gpu.json").write_text(json.dumps(result, indent=1))
    print("\n| model | format | seqs / batched tokens | KV dtype, tokens | single tok/s (HF bf16) | x "
          "| offline tok/s (HF bf16) | x | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, h = r["ours"], r["hf_bf16"] or {}
        hs, ho = h.get("single_tok_s"), h.get("offline_tok_s")
        print(f"| {r['shape']} | {r['format']} | {o['max_num_seqs']} / {o['max_batched_tokens']} "
              f"| {o['kv_cache_dtype']}, {o['kv_tokens']} | {o['single_tok_s']} ({hs}) | "
              f"{o['single_tok_s'] / hs if hs else float('nan'):.1f}x | {o['offline_tok_s']} "
              f"({ho}) | {o['offline_tok_s'] / ho if ho else float('nan'):.1f}x | {o['peak_gib']} |")


if __name__ == "__main__":
    main()
