"""Micro-benchmark: int4 tinygemm matmul vs dequantize+F.linear on CPU.

For SmolLM2-135M's linear shapes it times, per (type, N, K, M):
  int4       quant_kernels.cpu_int4.matmul on a prepared weight (x fp32 in, fp32 out)
  deq+lin    gguf_ref.dequantize of the raw GGML bytes, then F.linear in fp32
  lin(f32)   F.linear on a weight dequantized ahead of time (4 bytes per weight in RAM)
and prints a table plus, per shape, the smallest M at which deq+lin beats int4
(the switch point for a runtime that keeps only the quantized bytes).

    python scripts/bench_cpu_int4.py [--types Q4_1,Q8_0] [--m 1,8,64] [--threads N]

On a machine shared with other busy processes use --threads 1: multi-threaded torch ops
there wait on descheduled sibling threads and take whole scheduler slices (8-16 ms, up
to 30x slower), which swamps what is being measured.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants as gq  # noqa: E402

from quant_kernels import cpu_int4, gguf_ref  # noqa: E402

# (N, K) of SmolLM2-135M: q/o proj, k/v proj, gate/up, down, lm_head (tied token_embd)
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]


def _time_ms(fn, min_time: float = 0.2, max_reps: int = 50) -> float:
    """Best wall time of ``fn`` in ms after a warm-up (allocator, caches).

    The minimum, not the median: on a shared 2-core machine other processes steal whole
    scheduler slices (seen as 8-16 ms outliers, worse for multi-threaded ops whose
    threads wait on each other), and the minimum is the least disturbed estimate.
    """
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_1,Q8_0", help="comma list of Q4_0, Q4_1, Q8_0")
    ap.add_argument("--m", default="1,8,64", help="comma list of batch*seq sizes M")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    types = [Q[t.strip()] for t in args.types.split(",")]
    ms = [int(m) for m in args.m.split(",")]
    rng = np.random.default_rng(0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best-of times in ms")
    header = f"{'type':5} {'N':>6} {'K':>5} {'M':>4} {'int4':>9} {'deq+lin':>9} {'lin(f32)':>9}"
    print(header)
    print("-" * len(header))
    switch: list[str] = []
    for qtype in types:
        for n, k in SHAPES:
            w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
            raw = torch.from_numpy(gq.quantize(w, qtype))
            packed = cpu_int4.prepare(raw, qtype)
            w32 = gguf_ref.dequantize(raw, qtype)
            first_faster = None
            for m in ms:
                x = torch.randn(m, k)
                t_int4 = _time_ms(lambda: cpu_int4.matmul(x, packed))
                t_deq = _time_ms(lambda: F.linear(x, gguf_ref.dequantize(raw, qtype)))
                t_lin = _time_ms(lambda: F.linear(x, w32))
                if first_faster is None and t_deq < t_int4:
                    first_faster = m
                print(f"{qtype.name:5} {n:6d} {k:5d} {m:4d} "
                      f"{t_int4:9.3f} {t_deq:9.3f} {t_lin:9.3f}", flush=True)
            switch.append(f"{qtype.name} {n}x{k}: deq+lin faster from M="
                          + (str(first_faster) if first_faster else f"never (M <= {max(ms)})"))
    print("\nswitch points (smallest measured M where dequantize+linear beats int4):")
    print("\n".join("  " + s for s in switch))


if __name__ == "__main__":
    main()
