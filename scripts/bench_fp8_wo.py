"""FP8 weight-only (W8A16) kernel timing: the fused Triton kernel (quant_kernels.triton_fp8)
against cuBLAS ``F.linear`` on a dense fp16/bf16 weight and against the old per-call expansion
(``Fp8DequantKernel``: q * s to fp16/bf16 in torch, then ``F.linear``), all replayed from CUDA
graphs over 8 weight copies (the 50 MB L2 holds none of them between calls), so host
launch overhead drops out.  GPU only.

For M > 16 it also times the two prefill paths the dispatch chooses between (the fused
GEMM and Triton expansion + cuBLAS) so that ``triton_fp8.DEQUANT_GEMM_MIN_M`` can be set
from the table.  Every case is checked against the fp32 oracle before it is timed.

    PYTHONPATH=. python scripts/bench_fp8_wo.py [--budget 540] [--scales channel,block128]
        [--dtype float16] [--ms 1,4,16,64,256,1024,4096] [--out fp8_wo.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_wq_graphs import ROTATE, graph_time_us  # noqa: E402

from quant_kernels import triton_fp8 as t8  # noqa: E402
from quant_kernels import triton_fp8_kernels as k8  # noqa: E402
from quantrt.quant.fp8_kernels import Fp8DequantKernel  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (K, N)
MS = [1, 4, 16, 64, 256, 1024, 4096]
SCALES = {"channel": None, "block128": (128, 128)}
# relative error against the fp32 oracle above which a case is reported as wrong
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
HEADER = ("| scales | K | N | M | ours us | path | fused GEMM us | dequant+mm us | cuBLAS dense "
          "us | old expand us | vs cuBLAS | vs old | weight GB/s | rel err |")
DEVICE = "cuda"


def _old_kernel(q: torch.Tensor, s: torch.Tensor, block) -> Fp8DequantKernel:
    """The expansion kernel as the fp8 method builds it for one shard."""
    method = SimpleNamespace(p=SimpleNamespace(scheme="block" if block else "channel",
                                               block=block),
                             weight_scale=lambda raw: raw["weight_scale"].float())
    layer = SimpleNamespace(raw_shards=[{"weight": q, "weight_scale": s}],
                            output_sizes=[q.shape[0]])
    return Fp8DequantKernel(method, layer, q.device)


def _weights(k: int, n: int, block, dtype):
    """ROTATE (Fp8Weight, old kernel, dense weight in dtype) triples of random weights."""
    out = []
    for _ in range(ROTATE):
        q = (torch.randn(n, k, device=DEVICE) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        shape = (n, 1) if block is None else (-(-n // block[0]), -(-k // block[1]))
        s = torch.rand(shape, device=DEVICE) * 2e-4 + 1e-5
        w = t8.pack_fp8(q, s, block)
        out.append((w, _old_kernel(q, s, block),
                     torch.randn(n, k, device=DEVICE, dtype=dtype)))
    return out


def _path(m: int) -> str:
    if m <= t8.DECODE_MAX_M:
        return "gemv"
    return "gemm" if m < t8.DEQUANT_GEMM_MIN_M else "dequant+mm"


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def run_case(scales: str, k: int, n: int, m: int, weights, dtype) -> dict:
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    w0, old0, _ = weights[0]
    ref = x.float() @ t8.dequantize_fp8_ref(w0).t()  # fp32 oracle
    err = _rel(t8.fp8_matmul(x, w0), ref)
    old_err = _rel(old0(x), ref)
    outs = [torch.empty(m, n, device=DEVICE, dtype=dtype) for _ in weights]
    row = {"scales": scales, "K": k, "N": n, "M": m, "path": _path(m), "rel_err": err,
           "old_rel_err": old_err, "ok": err < TOL[dtype] and old_err < TOL[dtype]}
    row["ours_us"] = graph_time_us([lambda w=w, o=o: t8.fp8_matmul(x, w, out=o)
                                    for (w, _, _), o in zip(weights, outs)])
    if m > t8.DECODE_MAX_M:
        row["gemm_us"] = graph_time_us([lambda w=w, o=o: k8.gemm(x, w, o)
                                        for (w, _, _), o in zip(weights, outs)])
        row["dequant_us"] = graph_time_us([lambda w=w, o=o: t8.dequant_matmul(x, w, o)
                                           for (w, _, _), o in zip(weights, outs)])
    row["dense_us"] = graph_time_us([lambda d=d: F.linear(x, d) for _, _, d in weights])
    row["old_us"] = graph_time_us([lambda o=o: o(x) for _, o, _ in weights])
    wbytes = w0.q.numel() + w0.scales.numel() * 4
    row["weight_GBps"] = wbytes / row["ours_us"] / 1e3
    return row


def _fmt(row: dict) -> str:
    def us(key):
        return f"{row[key]:.1f}" if key in row else "-"
    flag = "" if row["ok"] else " WRONG"
    return (f"| {row['scales']} | {row['K']} | {row['N']} | {row['M']} | {us('ours_us')} | "
            f"{row['path']} | {us('gemm_us')} | {us('dequant_us')} | {us('dense_us')} | "
            f"{us('old_us')} | {row['dense_us'] / row['ours_us']:.2f}x | "
            f"{row['old_us'] / row['ours_us']:.2f}x | {row['weight_GBps']:.0f} | "
            f"{row['rel_err']:.1e}{flag} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds; cases not started by then are listed as skipped")
    ap.add_argument("--scales", default=",".join(SCALES), help=",".join(SCALES))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                    help="KxN,...")
    ap.add_argument("--out", default="fp8_wo.json")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    start = time.monotonic()
    torch.manual_seed(0)
    rows, skipped = [], []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype} "
          "activations, CUDA-graph replay, us per call\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for scales in args.scales.split(","):
        for k, n in shapes:
            if time.monotonic() - start > args.budget:
                skipped += [f"{scales} {k}x{n} M={m}" for m in ms]
                continue
            weights = _weights(k, n, SCALES[scales], dtype)
            for m in ms:
                if time.monotonic() - start > args.budget:
                    skipped.append(f"{scales} {k}x{n} M={m}")
                    continue
                row = run_case(scales, k, n, m, weights, dtype)
                rows.append(row)
                print(_fmt(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "dtype": args.dtype, "rows": rows, "skipped": skipped}, f,
                              indent=1)
            del weights
            torch.cuda.empty_cache()
    if skipped:
        print(f"\nbudget of {args.budget:.0f} s reached; skipped: {', '.join(skipped)}")
    wrong = [r for r in rows if not r["ok"]]
    if wrong:
        print(f"\n{len(wrong)} case(s) over the error bound {TOL[dtype]}: see WRONG above")
        sys.exit(1)


if __name__ == "__main__":
    main()
