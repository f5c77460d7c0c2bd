"""Decode (M <= 16) int4 kernels side by side, CUDA-graph replays over rotating weights:
the tensor-core MMA kernel (``triton_wq_mma``), the packed-half M = 1 kernel
(``triton_wq_gemv1``), the split-K decode kernel (``triton_wq_gemv``) and cuBLAS fp16.

    PYTHONPATH=. python scripts/bench_wq_mma.py [--out wq_mma.json] [--dtype fp16] \
        [--group 32] [--bits 8] [--shapes 8192x8192] [--ms 1,16] \
        [--configs '8:2;8:2:SCALES_AHEAD=1;4:1:DEPTH=3'] [--only-configs]

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
import triton
import triton.language as tl

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


@triton.jit
def _read_kernel(src, dst, n, BLOCK: tl.constexpr):
    # read floor: every byte of src once, 16-byte vector loads, one int per program out
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n, other=0, cache_modifier=".cg")
    tl.store(dst + tl.program_id(0), tl.xor_sum(v, axis=0))


def read_floor_us(nbytes: int) -> float:
    """CUDA-graph time to read ``nbytes`` (8 rotating buffers): the weight's memory floor."""
    n = -(-nbytes // 4)
    bufs = [torch.randint(0, 1 << 30, (n,), device="cuda", dtype=torch.int32)
            for _ in range(ROTATE)]
    block = 4096
    dst = torch.empty(-(-n // block), device="cuda", dtype=torch.int32)
    return graph_time_us([lambda b=b: _read_kernel[(dst.numel(),)](b, dst, n, BLOCK=block)
                          for b in bufs])


def fixed_configs(configs: str, warps: str) -> dict:
    """``--configs`` ('WARPS:PAIR[:KNOB=V...];...') and ``--warps`` (W = the config W:2) as
    {label: triton.Config}."""
    specs = [c for c in configs.split(";") if c] + [f"{w}:2" for w in warps.split(",") if w]
    out = {}
    for spec in specs:
        wp, pr, *kv = spec.split(":")
        knobs = {a if a != "MAXNREG" else "maxnreg": int(b) for a, b in (t.split("=") for t in kv)}
        out["mma_" + spec.replace(":", "_")] = mm._cfg(int(wp), int(pr), **knobs)
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="wq_mma.json")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--warps", default="",
                    help="also time these WARPS with two slabs per iteration (= --configs W:2)")
    ap.add_argument("--group", type=int, default=128, help="scale group (32, 64, 128, ...)")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--shapes", default=None, help="KxN,... (default: the five below)")
    ap.add_argument("--configs", default="",
                    help="also time these fixed MMA configs: 'WARPS:PAIR[:KNOB=V...];...', "
                         "knobs DEPTH, SCALES_AHEAD, MAXNREG (triton_wq_mma._cfg)")
    ap.add_argument("--read-floor", action="store_true",
                    help="also time a plain read of the weight's bytes (its memory floor)")
    ap.add_argument("--only-configs", action="store_true",
                    help="time only --configs and cuBLAS (no autotuning: for ncu)")
    args = ap.parse_args()
    shapes = ([tuple(int(v) for v in t.split("x")) for t in args.shapes.split(",")]
              if args.shapes else SHAPES)
    if os.path.isdir(args.out):
        args.out = os.path.join(args.out, f"wq_mma_b{args.bits}_g{args.group}.json")
    dt = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    fixed = fixed_configs(args.configs, args.warps)
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
            kern = {}
            if not args.only_configs:
                kern["mma"] = lambda i: mm.mma_matmul(x, ws[i], outs[i])
            for label, cfg in fixed.items():
                kern[label] = lambda i, cfg=cfg: mm.mma_matmul(x, ws[i], outs[i], config=cfg)
            if not args.only_configs:
                if m == 1 and g1.can_run(x, ws[0])[0]:
                    kern["gemv1"] = lambda i: g1.gemv1(x, ws[i], outs[i])
                kern["gemv"] = lambda i: gv.gemv(x, ws[i], outs[i])
            row = dict(k=k, n=n, m=m, dtype=args.dtype, group=g, bits=args.bits)
            t_fp16 = graph_time_us([lambda i=i: F.linear(xh, dense[i]) for i in range(ROTATE)])
            row["cublas_fp16_us"] = round(t_fp16, 2)
            if args.read_floor:
                t = read_floor_us(ws[0].nbytes)
                row["read_floor"] = dict(us=round(t, 2), x=round(t_fp16 / t, 2), err=0.0)
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
