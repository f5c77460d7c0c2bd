"""Decode (M <= 16) int4 kernels side by side, CUDA-graph replays over rotating weights:
the tensor-core MMA kernel (``triton_wq_mma``), the packed-half M = 1 kernel
(``triton_wq_gemv1``), the split-K decode kernel (``triton_wq_gemv``) and cuBLAS fp16.

    PYTHONPATH=. python scripts/bench_wq_mma.py [--out wq_mma.json] [--dtype fp16] \
        [--group 32] [--bits 8] [--shapes 8192x8192] [--ms 1,16]

Every timed kernel's output is first checked against ``wq_reference`` (relative error
printed).  Speedups are over cuBLAS fp16 ``F.linear`` in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wq_graphs import ROTATE, graph_time_us  # noqa: E402
from quant_kernels import triton_wq_gemv as gv  # noqa: E402
from quant_kernels import triton_wq_gemv1 as g1  # noqa: E402
from quant_kernels import triton_wq_mma as mm  # noqa: E402
from quant_kernels.triton_wq import pack_wq, wq_reference  # noqa: E402

# (K, N): the four shapes, then Llama-3-8B's fused q/k/v and o
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (4096, 6144)]
MS = [1, 2, 4, 8, 16]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="wq_mma.json")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--warps", default="", help="also time these fixed WARPS configs")
    ap.add_argument("--group", type=int, default=128, help="scale group (32, 64, 128, ...)")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--shapes", default=None, help="KxN,... (default: the five below)")
    args = ap.parse_args()
    shapes = ([tuple(int(v) for v in t.split("x")) for t in args.shapes.split(",")]
              if args.shapes else SHAPES)
    if os.path.isdir(args.out):
        args.out = os.path.join(args.out, f"wq_mma_b{args.bits}_g{args.group}.json")
    dt = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    torch.manual_seed(0)
    rows = []
    g = args.group
    for k, n in shapes:
        ws, dense = [], []
        for _ in range(ROTATE):
            lv = 1 << args.bits
            q = torch.randint(0, lv, (n, k), device="cuda", dtype=torch.int32)
            s = (torch.rand(n, k // g, device="cuda") + 0.5) / (lv * k ** 0.5)
            ws.append(pack_wq(q, s, -(lv // 2) * s, g, args.bits, dtype=dt))
            dense.append(torch.randn(n, k, device="cuda", dtype=torch.float16))
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=dt)
            xh = x.half()
            outs = [torch.empty(m, n, device="cuda", dtype=dt) for _ in ws]
            ref = wq_reference(x, ws[0])
            kern = {"mma": lambda i: mm.mma_matmul(x, ws[i], outs[i])}
            for wp in [int(v) for v in args.warps.split(",") if v]:
                kern[f"mma_w{wp}"] = (lambda i, wp=wp: mm.mma_matmul(x, ws[i], outs[i],
                                                                     config=mm._cfg(wp)))
            if m == 1 and g1.can_run(x, ws[0])[0]:
                kern["gemv1"] = lambda i: g1.gemv1(x, ws[i], outs[i])
            kern["gemv"] = lambda i: gv.gemv(x, ws[i], outs[i])
            row = dict(k=k, n=n, m=m, dtype=args.dtype, group=g, bits=args.bits)
            t_fp16 = graph_time_us([lambda i=i: F.linear(xh, dense[i]) for i in range(ROTATE)])
            row["cublas_fp16_us"] = round(t_fp16, 2)
            for name, fn in kern.items():
                outs[0].fill_(float("nan"))
                fn(0)
                torch.cuda.synchronize()
                err = rel(outs[0], ref)
                t = graph_time_us([lambda i=i, fn=fn: fn(i) for i in range(ROTATE)])
                row[name] = dict(us=round(t, 2), x=round(t_fp16 / t, 2), err=float(f"{err:.2e}"))
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "rows": rows}, f, indent=1)
    print("\n| K | N | M | cuBLAS fp16 us | " + " | ".join(
        k for k in rows[0] if isinstance(rows[0][k], dict)) + " |")
    for r in rows:
        cells = [f"{v['us']} ({v['x']}x, {v['err']:.0e})" for v in r.values() if isinstance(v, dict)]
        print(f"| {r['k']} | {r['n']} | {r['m']} | {r['cublas_fp16_us']} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
