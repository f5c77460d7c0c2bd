"""GPU benchmark: GGUF Q6_K on quant_kernels.triton_g16 vs cuBLAS fp16 F.linear.

For M in {1, 4, 16, 64, 256, 1024, 4096} and (K, N) in {(4096, 4096), (4096, 14336),
(14336, 4096), (8192, 8192)} it first checks g16_matmul against the fp32 oracle
(g16_reference) on fresh random data, then times in the same run:

  ours    g16_matmul as dispatched (decode kernel / fused GEMM / dequant + cuBLAS)
  fp16    F.linear with a dense fp16 weight (cuBLAS)
  fused   the fused GEMM kernel alone            } for M > 16, to place the
  deq     Triton dequantize to fp16 + cuBLAS     } DEQUANT_GEMM_MIN_M switch
  torch   (M = 1 only, eager) the path Q6_K took before: gguf_ref's torch dequantize +
          F.linear on every call

Kernel times are the median per-call time of a CUDA graph replaying the call over
rotating weights (enough copies to exceed the 50 MB L2 several times; CUDA events), so
host launch overhead drops out; it is measured once, eagerly, and printed apart.  GB/s
counts the Q6_K weight (210 bytes per 256 values), activations and outputs; "%copy" is
that over a device-to-device copy measured in the same run.  The first weight of each
shape is repacked from random GGUF blocks by ``to_g16`` (the load path); the others are
random tensors in the same layout (any bits are a valid weight), faster to build.

``--sweep`` instead times every pinned config of the decode kernel and the fused GEMM
(plus candidates) per (shape, M), each checked first, to choose the config lists.

    PYTHONPATH=. python scripts/bench_q6k.py [--quick] [--sweep] [--budget 300] [--out q6k.json]
"""
from __future__ import annotations

import argparse
import os
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from bench_wq_graphs import graph_time_us  # noqa: E402
from quant_kernels import gguf_ref  # noqa: E402
from quant_kernels import triton_g16 as tg  # noqa: E402
from quant_kernels.g16_layout import G16Weight, g16_reference, to_g16  # noqa: E402

MS = [1, 4, 16, 64, 256, 1024, 4096]
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
QUICK_MS = [1, 16, 256, 4096]
QUICK_SHAPES = [(4096, 4096), (8192, 8192)]
ROTATE_BYTES = 200 << 20  # > 3x the H100's 50 MB L2
MAX_COPIES = 8


def raw_q6k(n: int, k: int, seed: int) -> torch.Tensor:
    """Random Q6_K blocks uint8 [n, k / 256 * 210] with a sane fp16 d."""
    g = np.random.default_rng(seed)
    raw = g.integers(0, 256, size=(n * k // 256, 210), dtype=np.uint8)
    d = g.uniform(0.5, 1.5, size=raw.shape[0]) / (k ** 0.5 * 64 * 32)
    raw[:, 208:210] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1))


def random_weight(n: int, k: int, seed: int) -> G16Weight:
    """A random Q6_K weight built straight in the layout, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def ints(shape, bits, dtype):
        return torch.randint(-(1 << bits - 1), 1 << bits - 1, shape, device="cuda",
                             generator=g, dtype=torch.int64).to(dtype)
    d = (torch.rand(k // 256, n, device="cuda", generator=g) + 0.5) / (k ** 0.5 * 64 * 32)
    return G16Weight(ints((n, k // 8), 32, torch.int32), ints((n, k // 8), 16, torch.int16),
                     ints((k // 16, n), 8, torch.int8).t(), d.half().t(), None, None, k, 32)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6  # GB/s


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def path_of(m: int) -> str:
    return ("gemv" if m <= tg.DECODE_MAX_M else "gemm" if m < tg.DEQUANT_GEMM_MIN_M
            else "deq+cublas")


def weights_for(k, n):
    """(raw blocks, Q6_K weights on the GPU, dense fp16 weights) for one shape."""
    raw = raw_q6k(n, k, seed=0)
    w0 = to_g16(raw, Q.Q6_K, k).to("cuda")
    n_w = max(2, min(MAX_COPIES, -(-ROTATE_BYTES // w0.nbytes)))
    ws = [w0] + [random_weight(n, k, seed=i) for i in range(1, n_w)]
    n_d = max(2, min(MAX_COPIES, -(-ROTATE_BYTES // (n * k * 2))))
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
             for _ in range(n_d)]
    return raw, ws, dense


def run_shape(k, n, ms, copy_bw, rows, deadline):
    raw, ws, dense = weights_for(k, n)
    w0 = ws[0]
    for m in ms:
        if time.monotonic() > deadline:
            print(f"  time budget reached: skipping K={k} N={n} M>={m}", flush=True)
            return
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        row = dict(K=k, N=n, M=m, path=path_of(m))
        try:
            t0 = time.monotonic()
            y = tg.g16_matmul(x, w0)  # the first call autotunes this bucket
            row["tune_s"] = round(time.monotonic() - t0, 2)
            row["rel_err"] = rel_err(y, g16_reference(x, w0))
            outs = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in ws]
            row["ours_us"] = graph_time_us([lambda w=w, o=o: tg.g16_matmul(x, w, out=o)
                                            for w, o in zip(ws, outs)])
            row["fp16_us"] = graph_time_us([lambda w=w: F.linear(x, w) for w in dense])
            if m > tg.DECODE_MAX_M:
                row["fused_us"] = graph_time_us([lambda w=w, o=o: tg.gemm(x, w, o)
                                                 for w, o in zip(ws, outs)])
                row["deq_us"] = graph_time_us([lambda w=w, o=o: tg.dequant_matmul(x, w, o)
                                               for w, o in zip(ws, outs)])
            if m == 1:
                row.update(torch_path(raw, x, n, k))
            row["ours_GBps"] = (w0.nbytes + 2 * m * (k + n)) / row["ours_us"] / 1e3
            row["ours_copy_frac"] = row["ours_GBps"] / copy_bw
            row["speedup"] = row["fp16_us"] / row["ours_us"]
        except Exception as e:  # one broken shape must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(_line(row), flush=True)


def torch_path(raw, x, n, k) -> dict:
    """Eager time of the path Q6_K took before (or why it could not run)."""
    try:
        raw_cuda = raw.cuda()

        def fn():
            return F.linear(x, gguf_ref.dequantize(raw_cuda, Q.Q6_K, (n, k)).to(x.device, x.dtype))
        return {"torch_us": do_bench(fn, warmup=3, rep=30, return_mode="median") * 1e3}
    except Exception as e:
        return {"torch_error": f"{type(e).__name__}: {e}"[:200]}


def host_overhead_us() -> float:
    """Host time per eager g16_matmul call (M=1, 4096x4096): what CUDA graphs remove."""
    w = random_weight(4096, 4096, seed=0)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    tg.g16_matmul(x, w)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        tg.g16_matmul(x, w)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / 200 * 1e6


def _line(r) -> str:
    if "error" in r:
        return f"| {r['K']} | {r['N']} | {r['M']} | ERROR {r['error']} |"
    extra = (f"{r['fused_us']:.1f} | {r['deq_us']:.1f}" if "fused_us" in r else "- | -")
    old = f"{r['torch_us']:.0f}" if "torch_us" in r else "-"
    return (f"| {r['K']} | {r['N']} | {r['M']} | {r['ours_us']:.1f} | {r['fp16_us']:.1f} | "
            f"{r['speedup']:.2f}x | {r['ours_GBps']:.0f} | {100 * r['ours_copy_frac']:.0f}% | "
            f"{r['path']} | {extra} | {old} | {r['rel_err']:.1e} |")


HEADER = ("| K | N | M | ours us | fp16 us | speedup | GB/s | %copy | path | fused us | "
          "deq us | torch deq us | rel err |\n|" + "---|" * 13)


def suggested_switch(rows) -> int | None:
    """Smallest M from which dequant + cuBLAS beats the fused GEMM on every shape."""
    ms = sorted({r["M"] for r in rows if "deq_us" in r})
    return next((m for m in ms if all(r["deq_us"] < r["fused_us"] for r in rows
                                      if r["M"] >= m and "deq_us" in r)), None)


# candidates beyond the tuned lists: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages)
EXTRA_GEMV = [(1, 8, 256, 4, 1, 1), (1, 16, 128, 16, 1, 1), (1, 32, 256, 8, 2, 1),
              (16, 32, 256, 2, 4, 3), (16, 32, 128, 4, 4, 3), (16, 128, 256, 2, 8, 3)]
EXTRA_GEMM = [(64, 128, 128, 1, 4, 3), (128, 128, 128, 1, 8, 4), (64, 128, 256, 1, 8, 3),
              (32, 64, 256, 4, 4, 3)]


def sweep(shapes, deadline) -> list[dict]:
    """Every pinned decode / GEMM config per (shape, M), checked, then timed."""
    gemv_cfgs = tg.GEMV_CONFIGS + [tg._cfg(*c) for c in EXTRA_GEMV]
    gemm_cfgs = tg.GEMM_CONFIGS + [tg._cfg(*c, gm=8) for c in EXTRA_GEMM]
    out = []
    for k, n in shapes:
        _, ws, dense = weights_for(k, n)
        for m in (1, 4, 16, 64, 128, 256):
            if time.monotonic() > deadline:
                print(f"  time budget reached: skipping K={k} N={n} M>={m}", flush=True)
                return out
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = g16_reference(x, ws[0])
            fp16 = graph_time_us([lambda w=w: F.linear(x, w) for w in dense])
            res = []
            cands = [("gemv", c) for c in gemv_cfgs if m <= 16 and c.kwargs["BLOCK_M"] >= m
                     and (c.kwargs["BLOCK_M"] > 1 or m == 1)]
            cands += [("gemm", c) for c in gemm_cfgs if m > 1]
            for kind, c in cands:
                fn = tg.gemv if kind == "gemv" else tg.gemm
                name = f"{kind}:" + ",".join(str(v) for v in c.kwargs.values()) + \
                    f",w{c.num_warps},s{c.num_stages}"
                try:
                    o = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
                    fn(x, ws[0], o, config=c)
                    err = rel_err(o, ref)
                    if not err < 2e-3:
                        raise AssertionError(f"rel err {err}")
                    outs = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in ws]
                    us = graph_time_us([lambda w=w, o=o: fn(x, w, o, config=c)
                                        for w, o in zip(ws, outs)])
                    res.append((us, name, fn, c))
                except Exception as e:
                    lines = str(e).strip().splitlines() or [""]
                    print(f"  {name} K={k} N={n} M={m}: {type(e).__name__}: "
                          f"{lines[0][:150]} ... {lines[-1][:150]}", flush=True)
            deq = graph_time_us([lambda w=w: tg.dequant_matmul(x, w) for w in ws])
            res.sort(key=lambda r: r[0])
            portable = None
            if res:  # the best config again with the fp32 dequant instead of the PTX one
                _, _, fn, c = res[0]
                os.environ["QUANTRT_G16_FAST_DEQUANT"] = "0"
                outs = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in ws]
                portable = graph_time_us([lambda w=w, o=o: fn(x, w, o, config=c)
                                          for w, o in zip(ws, outs)])
                del os.environ["QUANTRT_G16_FAST_DEQUANT"]
            out.append(dict(K=k, N=n, M=m, fp16_us=fp16, deq_us=deq, portable_us=portable,
                            best=[r[:2] for r in res[:5]]))
            print(f"K={k} N={n} M={m}: fp16 {fp16:.1f} deq {deq:.1f} best-portable "
                  f"{portable or 0:.1f} | " + " | ".join(
                      f"{us:.1f} {name}" for us, name, _, _ in res[:5]), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="q6k.json")
    ap.add_argument("--quick", action="store_true", help="fewer M and shapes")
    ap.add_argument("--sweep", action="store_true", help="time every config instead")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds after which the remaining shapes are skipped")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_q6k.py needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.budget
    ms = QUICK_MS if args.quick else MS
    shapes = QUICK_SHAPES if args.quick else SHAPES
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {copy_bw:.0f} GB/s", flush=True)
    if args.sweep:
        Path(args.out).write_text(json.dumps(sweep(shapes, deadline), indent=1))
        return 0
    rows: list[dict] = []
    print(HEADER, flush=True)
    for k, n in shapes:
        run_shape(k, n, ms, copy_bw, rows, deadline)
        torch.cuda.empty_cache()
    result = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                  copy_GBps=copy_bw, host_overhead_us=host_overhead_us(), rows=rows,
                  seconds=round(time.monotonic() - start, 1),
                  suggested_DEQUANT_GEMM_MIN_M=suggested_switch(rows),
                  current_DEQUANT_GEMM_MIN_M=tg.DEQUANT_GEMM_MIN_M)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n## Q6_K g16_matmul vs fp16 cuBLAS, CUDA-graph replay ({props.name}, "
          f"{result['seconds']} s)\n")
    print(HEADER)
    for r in rows:
        print(_line(r))
    print(f"\nhost overhead per eager call: {result['host_overhead_us']:.1f} us; suggested "
          f"DEQUANT_GEMM_MIN_M: {result['suggested_DEQUANT_GEMM_MIN_M']} "
          f"(current {tg.DEQUANT_GEMM_MIN_M})")
    return 1 if any("error" in r or r.get("rel_err", 0) > 2e-3 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
