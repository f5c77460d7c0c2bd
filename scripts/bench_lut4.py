"""bitsandbytes NF4 kernel timing: the fused Triton code-book kernel (TritonLut4Kernel,
quant_kernels.triton_lut4) against cuBLAS ``F.linear`` on a dense fp16 weight and against
the old per-call expansion (Lut4Kernel: byte -> pair table in torch, then F.linear), all
replayed from CUDA graphs over 8 weight copies (the 50 MB L2 holds none of them between
calls), median of 20 replays, so host launch overhead drops out.

For M > 16 it also times the two paths the dispatch chooses between (the fused kernel
with M tiles, and Triton expansion + cuBLAS) so that ``triton_lut4.DEQUANT_GEMM_MIN_M``
can be set from the table.  Every case is checked against the fp32 oracle first.

    PYTHONPATH=. python scripts/bench_lut4.py [--out lut4.json] [--budget 540]
        [--ms 1,4,16,64,256,1024] [--shapes 4096x4096,8192x8192,4096x14336] [--blocksize 64]
    PYTHONPATH=. python scripts/bench_lut4.py --cpu-check   # tiny shapes, Triton
        interpreter, correctness only (no timings): checks the script itself runs
"""
from __future__ import annotations

import os
import sys

if "--cpu-check" in sys.argv:  # read by Triton when the kernels are decorated (import)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_wq_graphs import ROTATE, graph_time_us  # noqa: E402

from formats import bnb as bnb_format  # noqa: E402
from quant_kernels import triton_lut4 as t4  # noqa: E402
from quant_kernels import triton_lut4_kernels as k4  # noqa: E402
from quantrt.quant.lut_kernels import Lut4Kernel, TritonLut4Kernel  # noqa: E402

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336)]  # (K, N)
MS = [1, 4, 16, 64, 256, 1024]
CPU_SHAPES = [(128, 48), (256, 23)]
CPU_MS = [1, 3, 17]
TOL = 2e-3  # relative error against the fp32 oracle above which a case is reported wrong
HEADER = ("| K | N | M | ours us | path | fused us | dequant+mm us | cuBLAS fp16 us | "
          "old expand us | vs cuBLAS | vs old | weight GB/s | rel err |")


def _layer(k: int, n: int, blocksize: int, device: str, seed: int) -> SimpleNamespace:
    """What the bnb method hands its kernels for one NF4 shard: random code bytes and
    absmax made on the device (the CPU quantizer would take minutes for 8 copies of the
    large shapes; the kernels' speed does not depend on the values)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nk = n * k
    meta = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float16", "shape": [n, k]}
    raw = {"weight": torch.randint(0, 256, (nk // 2, 1), generator=gen, device=device,
                                   dtype=torch.uint8),
           "weight.absmax": torch.rand(nk // blocksize, generator=gen, device=device) + 0.05,
           "weight.quant_map": bnb_format.get_code("nf4").to(device),
           f"weight.{bnb_format.quant_state_key('nf4')}": bnb_format.build_quant_state(meta)}
    return SimpleNamespace(raw_shards=[raw], bnb_meta=[meta], output_sizes=[n], input_size=k,
                           params_dtype=torch.float16)


def _weights(k: int, n: int, blocksize: int, device: str, copies: int):
    """``copies`` (fused kernel, old kernel, dense fp16 weight) triples."""
    out = []
    for i in range(copies):
        layer = _layer(k, n, blocksize, device, i)
        fast = TritonLut4Kernel(None, layer, torch.device(device))
        old = Lut4Kernel(None, layer, torch.device(device))
        out.append((fast, old, old.parts[0].weight(torch.float16)))
    return out


def _path(m: int) -> str:
    if m <= t4.DECODE_MAX_M:
        return "decode"
    return "fused" if m < t4.DEQUANT_GEMM_MIN_M else "dequant+mm"


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def run_case(k: int, n: int, m: int, weights, timed: bool, device: str) -> dict:
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    fast0, old0, dense0 = weights[0]
    w0 = fast0.parts[0]
    ref = x.float() @ dense0.float().t()  # fp32 oracle on the bitsandbytes-rounded weight
    row = {"K": k, "N": n, "M": m, "path": _path(m), "rel_err": _rel(fast0(x), ref),
           "old_rel_err": _rel(old0(x), ref)}
    if m > t4.DECODE_MAX_M:
        o = torch.empty(m, n, device=device, dtype=torch.float16)
        row["fused_rel_err"] = _rel(k4.fused(x, w0, o), ref)
        row["dequant_rel_err"] = _rel(t4.dequant_matmul(x, w0), ref)
    row["ok"] = all(v < TOL for key, v in row.items() if key.endswith("rel_err"))
    if not timed:
        return row
    outs = [torch.empty(m, n, device=device, dtype=torch.float16) for _ in weights]
    parts = [f.parts[0] for f, _, _ in weights]
    row["ours_us"] = graph_time_us([lambda w=w, o=o: t4.lut4_matmul(x, w, out=o)
                                    for w, o in zip(parts, outs)])
    if m > t4.DECODE_MAX_M:
        row["fused_us"] = graph_time_us([lambda w=w, o=o: k4.fused(x, w, o)
                                         for w, o in zip(parts, outs)])
        row["dequant_us"] = graph_time_us([lambda w=w, o=o: t4.dequant_matmul(x, w, o)
                                           for w, o in zip(parts, outs)])
    row["dense_us"] = graph_time_us([lambda d=d: F.linear(x, d) for _, _, d in weights])
    row["old_us"] = graph_time_us([lambda o=o: o(x) for _, o, _ in weights])
    row["weight_GBps"] = w0.nbytes / row["ours_us"] / 1e3
    return row


def _fmt(row: dict) -> str:
    def us(key):
        return f"{row[key]:.1f}" if key in row else "-"

    def ratio(key):
        return f"{row[key] / row['ours_us']:.2f}x" if "ours_us" in row else "-"
    gbps = f"{row['weight_GBps']:.0f}" if "weight_GBps" in row else "-"
    flag = "" if row["ok"] else " WRONG"
    return (f"| {row['K']} | {row['N']} | {row['M']} | {us('ours_us')} | {row['path']} | "
            f"{us('fused_us')} | {us('dequant_us')} | {us('dense_us')} | {us('old_us')} | "
            f"{ratio('dense_us')} | {ratio('old_us')} | {gbps} | {row['rel_err']:.1e}{flag} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-check", action="store_true",
                    help="tiny shapes under the Triton interpreter, correctness only")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds; cases not started by then are listed as skipped")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--ms", default=None, help="M values, comma-separated")
    ap.add_argument("--shapes", default=None, help="KxN,...")
    ap.add_argument("--out", default="lut4.json", help="JSON file, or a folder to put "
                    "lut4.json in")
    args = ap.parse_args()
    if os.path.isdir(args.out):
        args.out = os.path.join(args.out, "lut4.json")
    cpu = args.cpu_check
    if not cpu and not torch.cuda.is_available():
        sys.exit("bench_lut4: needs a CUDA GPU (or --cpu-check for the interpreter run)")
    device = "cpu" if cpu else "cuda"
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (CPU_MS if cpu else MS)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
              if args.shapes else (CPU_SHAPES if cpu else SHAPES))
    name = "CPU (Triton interpreter)" if cpu else torch.cuda.get_device_name()
    start = time.monotonic()
    rows, skipped = [], []
    how = "correctness only" if cpu else "CUDA-graph replay, median us per call"
    print(f"{name}, torch {torch.__version__}, NF4, blocksize {args.blocksize}, "
          f"fp16 activations, {how}\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for k, n in shapes:
        if time.monotonic() - start > args.budget:
            skipped += [f"{k}x{n} M={m}" for m in ms]
            continue
        weights = _weights(k, n, args.blocksize, device, 1 if cpu else ROTATE)
        for m in ms:
            if time.monotonic() - start > args.budget:
                skipped.append(f"{k}x{n} M={m}")
                continue
            row = run_case(k, n, m, weights, not cpu, device)
            rows.append(row)
            print(_fmt(row), flush=True)
            with open(args.out, "w") as f:
                json.dump({"device": name, "torch": torch.__version__,
                           "blocksize": args.blocksize, "decode_max_m": t4.DECODE_MAX_M,
                           "dequant_gemm_min_m": t4.DEQUANT_GEMM_MIN_M, "rows": rows,
                           "skipped": skipped}, f, indent=1)
        del weights
        if not cpu:
            torch.cuda.empty_cache()
    if skipped:
        print(f"\nbudget of {args.budget:.0f} s reached; skipped: {', '.join(skipped)}")
    wrong = [r for r in rows if not r["ok"]]
    if wrong:
        print(f"\n{len(wrong)} case(s) over the error bound {TOL}: see WRONG above")
        sys.exit(1)


if __name__ == "__main__":
    main()
