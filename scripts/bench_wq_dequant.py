"""The dequantize + cuBLAS path's first half on the GPU: ``triton_wq_gemm.dequantize`` per
tile config, as GB/s (packed words, scales and biases read, the dense weight written)
against a device copy of the dense weight measured in the same run, and the whole path at
large M against cuBLAS; CUDA-graph replays over 8 rotating weight copies.

    PYTHONPATH=. python scripts/bench_wq_dequant.py [--shapes 8192x8192] [--format int4-g128]
        [--ms 4096] [--out dequant.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wq_graphs import FORMATS, ROTATE, graph_time_us  # noqa: E402
from bench_wq_ws import random_weight  # noqa: E402
from quant_kernels import triton_wq_gemm as gemm  # noqa: E402
from quant_kernels.wq_layout import dequantize_wq  # noqa: E402

SHAPES = "4096x4096,4096x14336,14336x4096,8192x8192"
# label -> (BLOCK_N, BLOCK_K at most, warps); the first is dequantize's default
CONFIGS = {f"{bn}x{bk}w{wp}": (bn, bk, wp) for bn, bk, wp in (
    (32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8), (32, 256, 4), (64, 256, 8),
    (16, 256, 4))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--format", default="int4-g128", choices=sorted(FORMATS))
    ap.add_argument("--ms", default="4096")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = torch.float16
    bits, group, act = FORMATS[args.format]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, {args.format} fp16")
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        ws = [random_weight(n, k, group, bits, dtype, seed=i) for i in range(ROTATE)]
        dense = [dequantize_wq(w, dtype) for w in ws]
        outs = [torch.empty_like(d) for d in dense]
        packed = sum(t.numel() * t.element_size() for t in (ws[0].qweight, ws[0].scales,
                                                            ws[0].bias))
        wbytes = n * k * 2
        copy_us = graph_time_us([lambda d=d, o=o: o.copy_(d) for d, o in zip(dense, outs)])
        row = {"k": k, "n": n, "copy_gbs": 2 * wbytes / copy_us / 1e3, "configs": {}}
        ref = dequantize_wq(ws[0], dtype)
        for label, (bn, bk, warps) in CONFIGS.items():
            got = gemm.dequantize(ws[0], dtype, bn, bk, warps)
            if not torch.equal(got, ref):
                print(f"  {label}: WRONG (max diff {(got - ref).abs().max().item():.3g})")
                continue
            us = graph_time_us([lambda w=w: gemm.dequantize(w, dtype, bn, bk, warps)
                                for w in ws])
            row["configs"][label] = {"us": us, "gbs": (packed + wbytes) / us / 1e3}
        best = min(row["configs"], key=lambda lb: row["configs"][lb]["us"])
        print(f"{k:>5}x{n:<5} copy {row['copy_gbs']:.0f} GB/s | " + " ".join(
            f"{lb}:{e['us']:.1f}us/{e['gbs'] / row['copy_gbs']:.0%}"
            for lb, e in row["configs"].items()) + f" | best {best}", flush=True)
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            y = torch.empty(m, n, device="cuda", dtype=dtype)
            cb = graph_time_us([lambda d=d: torch.mm(x, d.t(), out=y) for d in dense])
            path = {lb: graph_time_us(
                [lambda w=w, c=c: torch.mm(x, gemm.dequantize(w, dtype, *c).t(), out=y)
                 for w in ws]) for lb, c in (("default", next(iter(CONFIGS.values()))),
                                             ("best", CONFIGS[best]))}
            row[f"m{m}"] = {"cublas_us": cb, **path}
            print(f"    M={m}: cuBLAS {cb:.1f} us | dequant+cuBLAS default "
                  f"{cb / path['default']:.3f}x, best {cb / path['best']:.3f}x", flush=True)
        rows.append(row)
        del ws, dense, outs
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
