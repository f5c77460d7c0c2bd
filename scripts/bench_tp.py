"""Tensor parallelism on a multi-GPU host: TP=1 vs TP=N on random-init Llama-shape models.

    python scripts/bench_tp.py --shape llama-3-8b --formats bf16,awq --tp 1,2 --out $OUT
    python scripts/bench_tp.py --shape llama-3-70b --formats awq --tp 2 --out $OUT --estimate

For each format and TP size, one run of the engine: greedy tokens of three prompts (TP>1
must equal TP=1), single-stream decode (tokens/s and ms per step, CUDA graphs), offline
throughput over a fixed workload, GPU memory of every GPU (nvidia-smi) and rank 0's weights.
``--estimate`` adds ``quantrt estimate --num-gpus N``'s per-GPU weight bytes next to the
measured ones.  Results: ``tp.json`` under --out, a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_random_checkpoint as mrc  # noqa: E402

PROMPTS = [list(range(300, 332)), list(range(1000, 1017)), [4242] * 9]


def gpu_used_gib() -> list[float]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return [round(float(x) / 1024, 2) for x in out]


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(300, vocab) for _ in range(rng.randint(128, 1024))],
             rng.randint(64, 512)) for _ in range(n)]


def run_one(path: Path, tp: int, args) -> dict:
    from quantrt import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(path), device="cuda", tensor_parallel_size=tp, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_batched_tokens, enable_prefix_caching=False)
    res: dict = {"tp": tp, "load_s": round(time.perf_counter() - t0, 1),
                 "rank0_weights_gib": round(torch.cuda.memory_allocated(0) / 2**30, 2)}
    try:
        greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        res["greedy"] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
        n = args.single_tokens
        single = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        t = time.perf_counter()
        llm.generate([PROMPTS[0]], single)
        dt = time.perf_counter() - t
        res.update(single_tok_s=round(n / dt, 1), ms_per_step=round(1000 * dt / n, 2))
        if args.requests:
            reqs = workload(args.requests, llm.engine.lm.config.vocab_size)
            params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
                      for _, m in reqs]
            t = time.perf_counter()
            outs = llm.generate([p for p, _ in reqs], params)
            dt = time.perf_counter() - t
            gen = sum(len(o.outputs[0].token_ids) for o in outs)
            res.update(offline_tok_s=round(gen / dt, 1), offline_s=round(dt, 1), generated=gen)
        res["gpu_used_gib"] = gpu_used_gib()
        res["kv_blocks"] = llm.engine.blocks.num_blocks
    finally:
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()
    return res


def estimate_weights(path: Path, tp: int) -> dict:
    """``quantrt estimate --num-gpus tp``'s report (weights per GPU, KV budget)."""
    from quantrt.estimate import estimate

    return estimate(str(path), ["checkpoint"], gpu="H200", num_gpus=tp).to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(mrc.SHAPES))
    ap.add_argument("--formats", default="bf16,awq")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qrt_tp_ckpt"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--single-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--estimate", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "torch": torch.__version__, "shape": args.shape, "runs": {}}
    for fmt in args.formats.split(","):
        path = args.work / f"{args.shape}-{fmt}"
        if not (path / "config.json").exists():
            t = time.perf_counter()
            mrc.make(args.shape, fmt, path)
            print(f"made {path} in {time.perf_counter() - t:.0f}s", flush=True)
            torch.cuda.empty_cache()
        runs = []
        for tp in (int(x) for x in args.tp.split(",")):
            try:
                r = run_one(path, tp, args)
            except Exception as exc:  # noqa: BLE001 - record and go on with the next run
                r = {"tp": tp, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            if args.estimate and "error" not in r:
                try:
                    r["estimate"] = estimate_weights(path, tp)
                except Exception as exc:  # noqa: BLE001
                    r["estimate"] = f"{type(exc).__name__}: {exc}"
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("greedy", "estimate")}),
                  flush=True)
            (args.out / "tp.json").write_text(json.dumps(results, indent=1))
        base = next((r for r in runs if r.get("tp") == 1 and "greedy" in r), None)
        for r in runs:
            if base is not None and "greedy" in r:
                r["greedy_equals_tp1"] = r["greedy"] == base["greedy"]
        results["runs"][fmt] = runs
        (args.out / "tp.json").write_text(json.dumps(results, indent=1))
    print(f"\n| format | TP | single tok/s | ms/step | offline tok/s | greedy = TP1 | GPU used GiB |")
    print("|---|---|---|---|---|---|---|")
    for fmt, runs in results["runs"].items():
        for r in runs:
            print(f"| {fmt} | {r['tp']} | {r.get('single_tok_s')} | {r.get('ms_per_step')} | "
                  f"{r.get('offline_tok_s')} | {r.get('greedy_equals_tp1')} | "
                  f"{r.get('gpu_used_gib', r.get('error'))} |")


if __name__ == "__main__":
    main()
