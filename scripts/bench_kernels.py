"""GPU benchmark: quant_kernels.triton_wq.wq_matmul vs cuBLAS fp16 F.linear.

For 4-bit group-128 and 8-bit per-channel weights, M in {1, 4, 16, 64, 256, 1024, 4096}
and (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)} it checks
wq_matmul against wq_reference (fresh random data), then times, in the same run:

  ours    wq_matmul as dispatched (decode kernel / fused GEMM / dequant + cuBLAS)
  fp16    F.linear with a dense fp16 weight (cuBLAS)
  fused   the fused GEMM kernel alone        } for M > 16, to place the
  deq     dequantize to fp16 + cuBLAS alone  } DEQUANT_GEMM_MIN_M switch

Times are medians of triton.testing.do_bench (which also clears L2 between runs), each
call rotating over enough weight/activation buffers that they exceed the L2 several
times over.  GB/s counts weight bytes (packed words + scales + bias), activations and
outputs; "%copy" is that over a large device-to-device copy measured in the same run.

    PYTHONPATH=. python scripts/bench_kernels.py --out kernels.json [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from quant_kernels import triton_wq as tw  # noqa: E402
from quant_kernels import triton_wq_gemm as gm  # noqa: E402

MS = [1, 4, 16, 64, 256, 1024, 4096]
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
FORMATS = [(4, 128), (8, "K")]
QUICK_MS = [1, 16, 256, 4096]
QUICK_SHAPES = [(4096, 4096), (8192, 8192)]
ROTATE_BYTES = 200 << 20  # > 3x the H100's 50 MB L2


def make_weight(n, k, bits, group, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gs = k if group == "K" else group
    gn = -(-k // gs)
    q = torch.randint(0, 1 << bits, (n, k), device="cuda", generator=g, dtype=torch.int32)
    s = (torch.rand(n, gn, device="cuda", generator=g) + 0.5) / (k ** 0.5 * (1 << bits))
    z = torch.randint(0, 1 << bits, (n, gn), device="cuda", generator=g).float()
    return tw.pack_wq(q, s, -z * s, gs, bits)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6  # GB/s


def bench(fn, args_list, rep) -> float:
    """Median us of fn over rotating argument tuples."""
    it = itertools.cycle(args_list)
    return do_bench(lambda: fn(*next(it)), warmup=10, rep=rep, return_mode="median") * 1e3


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_shape(bits, group, k, n, ms, rep, copy_bw, rows, deadline):
    wq0 = make_weight(n, k, bits, group, seed=0)
    n_w = max(2, min(8, -(-ROTATE_BYTES // wq0.nbytes)))
    wqs = [wq0] + [make_weight(n, k, bits, group, seed=i) for i in range(1, n_w)]
    n_d = max(2, min(4, -(-ROTATE_BYTES // (n * k * 2))))
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
             for _ in range(n_d)]
    fmt = f"int{bits} g{group}"
    for m in ms:
        if time.monotonic() > deadline:
            print(f"  time budget reached: skipping {fmt} K={k} N={n} M>={m}", flush=True)
            return
        xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(n_w)]
        row = dict(format=fmt, bits=bits, group=str(group), K=k, N=n, M=m)
        try:
            t0 = time.monotonic()
            y = tw.wq_matmul(xs[0], wq0)            # first call autotunes this bucket
            row["tune_s"] = round(time.monotonic() - t0, 2)
            row["rel_err"] = rel_err(y, tw.wq_reference(xs[0], wq0))
            ours = list(zip(xs, wqs))
            row["ours_us"] = bench(tw.wq_matmul, ours, rep)
            row["fp16_us"] = bench(F.linear, list(zip(xs, itertools.cycle(dense))), rep)
            if m > tw.DECODE_MAX_M:
                outs = [torch.empty(m, n, device="cuda", dtype=torch.float16)]
                gemm_args = [(x, w, outs[0]) for x, w in ours]
                gm.gemm(*gemm_args[0])
                row["fused_us"] = bench(gm.gemm, gemm_args, rep)
                row["deq_us"] = bench(tw.dequant_matmul, ours, rep)
            row["path"] = ("gemv" if m <= tw.DECODE_MAX_M else
                           "gemm" if m < tw.DEQUANT_GEMM_MIN_M else "deq+cublas")
            wbytes = wq0.nbytes + 2 * m * (k + n)
            row["ours_GBps"] = wbytes / row["ours_us"] / 1e3
            row["ours_copy_frac"] = row["ours_GBps"] / copy_bw
            row["fp16_GBps"] = (2 * n * k + 2 * m * (k + n)) / row["fp16_us"] / 1e3
            row["speedup"] = row["fp16_us"] / row["ours_us"]
        except Exception as e:  # keep going: one broken shape must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(_line(row), flush=True)
        del xs


def _line(r) -> str:
    if "error" in r:
        return f"| {r['format']} | {r['K']} | {r['N']} | {r['M']} | ERROR {r['error']} |"
    extra = (f"{r['fused_us']:.1f} | {r['deq_us']:.1f}" if "fused_us" in r else "- | -")
    return (f"| {r['format']} | {r['K']} | {r['N']} | {r['M']} | {r['ours_us']:.1f} | "
            f"{r['fp16_us']:.1f} | {r['speedup']:.2f}x | {r['ours_GBps']:.0f} | "
            f"{100 * r['ours_copy_frac']:.0f}% | {r['path']} | {extra} | {r['rel_err']:.1e} |")


HEADER = ("| format | K | N | M | ours us | fp16 us | speedup | GB/s | %copy | path | "
          "fused us | deq us | rel err |\n|" + "---|" * 13)


def verdict(rows) -> dict:
    """The product targets on (8192, 8192) 4-bit g128, and a suggested switch point."""
    def get(m):
        return next((r for r in rows if r["format"] == "int4 g128" and r["K"] == 8192
                     and r["N"] == 8192 and r["M"] == m and "speedup" in r), None)
    out = {}
    for m, target in ((1, 3.0), (16, 2.0)):
        r = get(m)
        out[f"M{m}_speedup"] = None if r is None else round(r["speedup"], 2)
        out[f"M{m}_target"] = target
    big = [r for r in rows if r["format"] == "int4 g128" and r["K"] == 8192 and "speedup" in r]
    out["min_speedup_8192"] = round(min(r["speedup"] for r in big), 2) if big else None
    # smallest M from which dequant+cuBLAS beats the fused GEMM on every shape measured
    ms = sorted({r["M"] for r in rows if "deq_us" in r})
    switch = next((m for m in ms if all(r["deq_us"] < r["fused_us"] for r in rows
                                        if r["M"] >= m and "deq_us" in r)), None)
    out["suggested_DEQUANT_GEMM_MIN_M"] = switch
    out["current_DEQUANT_GEMM_MIN_M"] = tw.DEQUANT_GEMM_MIN_M
    return out


def host_overhead_us() -> float:
    """Host time per wq_matmul call (M=1, 4096x4096): what CUDA graphs would remove."""
    w = make_weight(4096, 4096, 4, 128, seed=0)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    tw.wq_matmul(x, w)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        tw.wq_matmul(x, w)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / 200 * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--quick", action="store_true", help="fewer M and shapes, shorter timing")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds after which the remaining shapes are skipped")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.budget
    ms = QUICK_MS if args.quick else MS
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rep = 30 if args.quick else 60
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {copy_bw:.0f} GB/s, fast dequant {tw._gemv.fast_dequant_ok(torch.float16, 4)}",
          flush=True)
    rows: list[dict] = []
    print(HEADER, flush=True)
    for bits, group in FORMATS:
        for k, n in shapes:
            run_shape(bits, group, k, n, ms, rep, copy_bw, rows, deadline)
            torch.cuda.empty_cache()
    result = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                  copy_GBps=copy_bw, host_overhead_us=host_overhead_us(), rows=rows,
                  verdict=verdict(rows), seconds=round(time.monotonic() - start, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n## wq_matmul vs fp16 cuBLAS ({props.name}, {result['seconds']} s)\n")
    print(HEADER)
    for r in rows:
        print(_line(r))
    print(f"\nhost overhead per call: {result['host_overhead_us']:.1f} us; "
          f"verdict: {json.dumps(result['verdict'])}")
    return 1 if any("error" in r or r.get("rel_err", 0) > 2e-3 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
