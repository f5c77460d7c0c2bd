"""Where a decode step's time goes: GPU kernels of one greedy stream (issue 5's
single-stream target) or of --batch concurrent streams (its offline target) on the engine,
grouped by kernel name, per step.

    PYTHONPATH=. python scripts/profile_decode.py --shape llama-3-8b --format awq --out DIR
    PYTHONPATH=. python scripts/profile_decode.py --batch 256 --prompt-len 640 --tokens 16

Builds the random-init checkpoint (scripts/make_random_checkpoint.py) unless it exists,
generates --tokens tokens once to warm up (CUDA graphs captured, kernels tuned), then
again under torch.profiler, with CUDA graphs (the benchmarked configuration) and, with
--eager, also without.  Per run it prints: wall ms per step, GPU busy ms per step (sum of
kernel times), and every kernel's count and microseconds per step, largest first; the same
goes to DIR/profile_decode.json.  With --batch B > 1: B requests of --prompt-len random
tokens are prefilled first (not profiled); then --tokens decode steps of all B are timed
and another --tokens are profiled.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_random_checkpoint as mrc  # noqa: E402


HOST_GAP_US = 30.0  # an idle GPU gap longer than this is the host's step work, not a launch


def idle_gaps(spans: list[tuple[float, float]], steps: int) -> dict:
    """Idle time between device activities per step: gaps shorter than HOST_GAP_US (kernel
    launch latency inside a graph) and longer ones (the host between steps)."""
    spans.sort()
    short = long = 0.0
    end = spans[0][1] if spans else 0.0
    for a, b in spans[1:]:
        gap = a - end
        if gap > 0:
            if gap < HOST_GAP_US:
                short += gap
            else:
                long += gap
        end = max(end, b)
    return dict(launch_gaps_us_per_step=round(short / steps, 1),
                host_gaps_us_per_step=round(long / steps, 1))


def kernel_table(prof, steps: int) -> tuple[float, list[dict], dict]:
    """(GPU busy us per step, per-kernel rows, idle gaps) from the profiler's device events."""
    per = defaultdict(lambda: [0, 0.0])
    spans = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            row = per[ev.name]
            row[0] += 1
            row[1] += ev.time_range.elapsed_us()
            spans.append((ev.time_range.start, ev.time_range.end))
    rows = [dict(kernel=name[:110], per_step=round(c / steps, 2), us_per_step=round(t / steps, 1))
            for name, (c, t) in per.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return sum(r["us_per_step"] for r in rows), rows, idle_gaps(spans, steps)


def timed_then_profiled(run, steps: int) -> tuple[float, float, list[dict], dict]:
    """``run()`` (``steps`` decode steps) once timed, once under the profiler: (wall s per
    step, GPU busy us per step, per-kernel rows, idle gaps)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        run()
        torch.cuda.synchronize()
    return (wall, *kernel_table(prof, steps))


def profile(path: Path, tokens: int, graphs: bool) -> dict:
    from quantrt import LLM, SamplingParams

    llm = LLM(str(path), device="cuda", max_num_seqs=8, enable_prefix_caching=False,
              cuda_graphs=graphs)
    prompt = list(range(300, 332))
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], sp)
    wall, busy, rows, gaps = timed_then_profiled(lambda: llm.generate([prompt], sp), tokens)
    llm.shutdown()
    del llm
    torch.cuda.empty_cache()
    return dict(cuda_graphs=graphs, wall_ms_per_step=round(wall * 1e3, 3),
                tok_s=round(1 / wall, 1), gpu_busy_ms_per_step=round(busy / 1e3, 3),
                **gaps, kernels=rows)


def profile_batch(path: Path, tokens: int, batch: int, prompt_len: int) -> dict:
    """--tokens decode steps of ``batch`` streams, after their prompts are prefilled."""
    import random

    from quantrt import LLM, SamplingParams

    llm = LLM(str(path), device="cuda", max_num_seqs=batch, enable_prefix_caching=False,
              max_num_batched_tokens=max(8192, prompt_len))
    eng, rng = llm.engine, random.Random(0)
    vocab = eng.lm.config.vocab_size
    sp = SamplingParams(max_tokens=3 * tokens + 8, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        eng.add_request([rng.randrange(vocab // 4, vocab) for _ in range(prompt_len)], sp,
                        stream_text=False)
    sched = eng.scheduler
    while sched.waiting or any(s.num_cached < len(s.prompt_ids) for s in sched.running):
        eng.step()
    for _ in range(4):  # graphs of this batch size captured, overlapped steps under way
        eng.step()
    running = len(sched.running)

    def steps() -> None:
        for _ in range(tokens):
            eng.step()
    wall, busy, rows, gaps = timed_then_profiled(steps, tokens)
    llm.shutdown()
    del llm, eng
    torch.cuda.empty_cache()
    return dict(cuda_graphs=True, batch=running, prompt_len=prompt_len,
                wall_ms_per_step=round(wall * 1e3, 3), tok_s=round(running / wall, 1),
                gpu_busy_ms_per_step=round(busy / 1e3, 3), **gaps, kernels=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(mrc.SHAPES))
    ap.add_argument("--format", default="awq", choices=mrc.FORMATS)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qrt_bench_ckpt"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--eager", action="store_true", help="also profile without CUDA graphs")
    ap.add_argument("--batch", type=int, default=1, help="concurrent streams (decode only)")
    ap.add_argument("--prompt-len", type=int, default=640, help="prompt tokens with --batch")
    args = ap.parse_args()
    if args.batch < 1 or args.prompt_len < 1 or args.tokens < 1:
        ap.error("--batch, --prompt-len and --tokens must be >= 1")
    path = args.work / f"{args.shape}-{args.format}"
    if not (path / "config.json").exists():
        t = time.perf_counter()
        mrc.make(args.shape, args.format, path)
        print(f"made {path} in {time.perf_counter() - t:.0f} s", flush=True)
    if args.batch > 1:
        runs = [profile_batch(path, args.tokens, args.batch, args.prompt_len)]
    else:
        runs = [profile(path, args.tokens, True)]
    if args.eager and args.batch == 1:
        runs.append(profile(path, args.tokens, False))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode.json").write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=args.shape,
             format=args.format, tokens=args.tokens, runs=runs), indent=1))
    for r in runs:
        print(f"\n== batch {r.get('batch', 1)}, cuda_graphs={r['cuda_graphs']}: "
              f"{r['wall_ms_per_step']} ms/step wall "
              f"({r['tok_s']} tok/s), GPU busy {r['gpu_busy_ms_per_step']} ms/step, idle "
              f"{r['launch_gaps_us_per_step']} us in launch gaps (< {HOST_GAP_US:.0f} us) and "
              f"{r['host_gaps_us_per_step']} us in host gaps per step (under the profiler)")
        for k in r["kernels"][:40]:
            print(f"{k['us_per_step']:9.1f} us {k['per_step']:7.2f}x  {k['kernel']}")


if __name__ == "__main__":
    main()
