"""GPU sweep of the decode-side int4 kernels under CUDA graphs (issue: kernels).

For int4 group-128 weights, each (K, N) and M it checks every candidate against
``wq_reference`` (fresh random data, NaN-poisoned output) and times it as the median
per-call time of a CUDA graph over 8 weight copies (more than L2 holds), next to cuBLAS
``F.linear`` with a dense weight of the same dtype timed the same way.  Candidates:

  v1:<cfg>     the packed-half M == 1 kernel (``triton_wq_gemv1``), fp16 and bf16
  gemv:<cfg>   the generic decode kernel: FMA path (BLOCK_M=1) or tl.dot on the
               interleaved tile (BLOCK_M=16)
  swap:<cfg>   the generic kernel with BLOCK_M > 16 (weight-stationary "swap AB" GEMM)
  gemm:<cfg>   the x-stationary fused GEMM, deq: dequantize + cuBLAS (M > 16)

    PYTHONPATH=. python scripts/sweep_gemv.py --out $OUT/sweep_gemv.json [--budget 400]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from bench_kernels import copy_bandwidth, rel_err  # noqa: E402
from bench_wq_graphs import graph_time_us  # noqa: E402
from quant_kernels import triton_wq as tw  # noqa: E402
from quant_kernels import triton_wq_gemm as gm  # noqa: E402
from quant_kernels import triton_wq_gemv as gv  # noqa: E402
from quant_kernels import triton_wq_gemv1 as g1  # noqa: E402

ROTATE = 8
SHAPES = [(8192, 8192), (4096, 4096), (4096, 14336), (14336, 4096), (4096, 6144),
          (4096, 28672)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]

V1 = [g1._cfg1(bn, 128, nsub, sk, w, pf, st) for bn, nsub, sk, w, pf, st in
      ((128, 1, 8, 4, 0, 3), (128, 1, 16, 4, 0, 3), (128, 1, 4, 4, 0, 3), (64, 2, 4, 4, 0, 3),
       (64, 2, 8, 4, 0, 3), (128, 2, 8, 4, 0, 4), (256, 1, 8, 8, 0, 3), (128, 2, 4, 4, 1, 1),
       (128, 1, 8, 2, 1, 1), (128, 4, 4, 4, 0, 3))]
OLD1 = [gv._cfg(1, bn, 128, sk, w, 1) for bn, sk, w in ((64, 4, 4), (64, 8, 4))]
DOT16 = [gv._cfg(16, bn, bk, sk, w, st) for bn, bk, sk, w, st in
         ((64, 128, 4, 4, 3), (64, 128, 8, 4, 3), (64, 128, 8, 4, 4), (64, 128, 16, 4, 3),
          (64, 128, 4, 4, 5), (128, 128, 8, 4, 3), (64, 64, 8, 4, 4), (64, 128, 4, 2, 3),
          (32, 128, 16, 2, 4), (128, 128, 8, 8, 4), (64, 128, 16, 4, 4))]
SWAP = [gv._cfg(bm, bn, bk, sk, w, st) for bm, bn, bk, sk, w, st in
        ((32, 64, 128, 4, 4, 4), (32, 128, 128, 4, 8, 3), (32, 64, 128, 8, 4, 3),
         (64, 64, 128, 2, 4, 4), (64, 128, 128, 2, 8, 3), (64, 128, 128, 4, 8, 3))]
# M > 64: the weight-stationary kernel with large M tiles.  The dequantized weight tile is
# the MMA's A operand, which wgmma may take from registers (the x-stationary GEMM's weight
# is its B operand and must round-trip through shared memory).
SWAP_BIG = [gv._cfg(bm, bn, bk, sk, w, st) for bm, bn, bk, sk, w, st in
            ((128, 128, 64, 1, 8, 3), (128, 128, 64, 1, 8, 4), (128, 128, 128, 1, 8, 3),
             (128, 64, 128, 1, 4, 3), (128, 64, 64, 1, 4, 4), (256, 128, 64, 1, 8, 3),
             (256, 128, 64, 1, 8, 4), (256, 64, 64, 1, 4, 3), (256, 128, 128, 1, 8, 2),
             (256, 64, 128, 1, 4, 3), (128, 256, 64, 1, 8, 3), (64, 128, 64, 1, 8, 4),
             (128, 128, 64, 2, 8, 3), (256, 128, 64, 2, 8, 3), (64, 128, 128, 1, 4, 3),
             (64, 256, 64, 1, 8, 3))]
GEMM = [gm._cfg(bm, bn, bk, sk, w, st, 8) for bm, bn, bk, sk, w, st in
        ((64, 64, 128, 2, 4, 4), (64, 128, 128, 2, 4, 3), (128, 128, 64, 1, 8, 3),
         (128, 128, 64, 2, 8, 3))]


def name(kind, c):
    k = c.kwargs
    bm = f"{k['BLOCK_M']}x" if "BLOCK_M" in k else ""
    bm += f"n{k['NSUB']}x" if "NSUB" in k else ""
    pf = f"pf{k['PREFETCH']}" if "PREFETCH" in k else ""
    return (f"{kind}:{bm}{k['BLOCK_N']}x{k['BLOCK_K']}s{k['SPLIT_K']}w{c.num_warps}"
            f"st{c.num_stages}{pf}")


def candidates(m, dtype):
    out = []
    if m == 1:
        out += [(name("v1", c), lambda x, w, o, c=c: g1.gemv1(x, w, o, config=c)) for c in V1]
        out += [(name("gemv", c), lambda x, w, o, c=c: gv.run_config(x, w, o, c)) for c in OLD1]
    if m <= 16:
        out += [(name("gemv", c), lambda x, w, o, c=c: gv.run_config(x, w, o, c))
                for c in DOT16]
    out += [(name("swap", c), lambda x, w, o, c=c: gv.run_config(x, w, o, c))
            for c in SWAP if 16 < m <= c.kwargs["BLOCK_M"] <= 2 * m]
    if m > 64:
        out += [(name("swap", c), lambda x, w, o, c=c: gv.run_config(x, w, o, c))
                for c in SWAP_BIG if c.kwargs["BLOCK_M"] <= 2 * m]
    out.append(("auto", lambda x, w, o: tw.wq_matmul(x, w, out=o)))
    if m > 16:
        out += [(name("gemm", c), lambda x, w, o, c=c: gm.gemm(x, w, o, config=c))
                for c in GEMM if c.kwargs["BLOCK_M"] <= max(32, 2 * m)]
        out.append(("deq", lambda x, w, o: tw.dequant_matmul(x, w, o)))
    return out


def make_weights(n, k, dtype, count, group=128):
    out = []
    for i in range(count):
        g = torch.Generator(device="cuda").manual_seed(i)
        gn = -(-k // group)
        q = torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.int32)
        s = (torch.rand(n, gn, device="cuda", generator=g) + 0.5) / (k ** 0.5 * 16)
        z = torch.randint(0, 16, (n, gn), device="cuda", generator=g).float()
        out.append(tw.pack_wq(q, s, -z * s, group, 4, dtype=dtype))
    return out


def sweep(k, n, dtype, ms, rows, deadline, copy_bw, group=128):
    ws = make_weights(n, k, dtype, ROTATE, group)
    dense = [torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for _ in range(4)]
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = tw.wq_reference(x, ws[0])
        outs = [torch.empty(m, n, device="cuda", dtype=dtype) for _ in range(ROTATE)]
        base_t = graph_time_us([lambda d=d: F.linear(x, d) for d in dense * 2])
        base = dict(K=k, N=n, M=m, group=group, dtype=str(dtype).split(".")[-1], dense_us=base_t)
        results = []
        for label, fn in candidates(m, dtype):
            if time.monotonic() > deadline:
                print(f"deadline: stop at K={k} N={n} M={m}", flush=True)
                return False
            row = {**base, "kind": label}
            try:
                poison = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                fn(x, ws[0], poison)
                torch.cuda.synchronize()
                row["nan"] = bool(torch.isnan(poison).any())
                row["rel_err"] = rel_err(poison, ref)
                fn(x, ws[1], outs[1])
                row["rel_err2"] = rel_err(outs[1], tw.wq_reference(x, ws[1]))
                row["us"] = graph_time_us([lambda w=w, o=o: fn(x, w, o)
                                           for w, o in zip(ws, outs)])
                row["speedup"] = base_t / row["us"]
                row["copy_frac"] = (ws[0].nbytes + 2 * m * (k + n)) / row["us"] / 1e3 / copy_bw
                results.append(row)
            except Exception as e:  # one bad config must not hide the rest
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                print(f"  {label}: {row['error']}", flush=True)
            rows.append(row)
        ok = [r for r in results if not r["nan"] and r["rel_err"] < 1e-2 and r["rel_err2"] < 1e-2]
        for fam in ("v1", "gemv", "swap", "gemm", "deq", "auto"):
            best = min((r for r in ok if r["kind"].split(":")[0] == fam),
                       key=lambda r: r["us"], default=None)
            if best:
                print(f"{base['dtype']} g{group} K={k} N={n} M={m}: dense {base_t:.1f} us | "
                      f"{best['kind']} {best['us']:.1f} us {best['speedup']:.2f}x copy {best['copy_frac']:.0%} "
                      f"err {best['rel_err']:.1e}", flush=True)
        bad = [r["kind"] for r in results if r not in ok]
        if bad:
            errs = [(r["nan"], r["rel_err"]) for r in results if r not in ok]
            print(f"  wrong results: {bad} {errs[:4]}")
    del ws, dense
    torch.cuda.empty_cache()
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sweep_gemv.json")
    ap.add_argument("--budget", type=float, default=400)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=";".join(f"{k},{n}" for k, n in SHAPES))
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--groups", default="128", help="int4 group sizes, e.g. 128,32")
    ap.add_argument("--ptx", default=None,
                    help="folder: copy the compiled PTX of the swap kernels there and print "
                         "which MMA instructions they use")
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget
    ms = [int(v) for v in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"copy {copy_bw:.0f} GB/s", flush=True)
    rows = []
    # bf16: only the shape of the kernel target, M <= 16
    jobs = [(dtype, k, n, group) for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]
            for k, n in shapes if dtype == torch.float16 or (k, n) == shapes[0]
            for group in [int(v) for v in args.groups.split(",")]]
    for dtype, k, n, group in jobs:
        sel = ms if dtype == torch.float16 else [m for m in ms if m <= 16]
        finished = sweep(k, n, dtype, sel, rows, deadline, copy_bw, group)
        Path(args.out).write_text(json.dumps({"copy_GBps": copy_bw, "rows": rows}, indent=1))
        if not finished:  # the budget is spent: no more weights built for later jobs
            break
    if args.ptx:
        dump_ptx(Path(args.ptx))
    return 0


def dump_ptx(dest: Path) -> None:
    """Which MMA instructions the compiled weight-stationary kernels use: wgmma whose A
    operand is a register list (``{%r..}``) rather than a shared-memory descriptor is what
    the large-M swap tiles are meant to get."""
    import os
    import re
    import shutil
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    dest.mkdir(parents=True, exist_ok=True)
    for i, ptx in enumerate(sorted(cache.glob("*/_wq_gemv_kernel.ptx"))):
        text = ptx.read_text()
        ops = sorted({m.group(0) for m in re.finditer(r"(wgmma\.mma_async\S*|mma\.sync\S*)", text)})
        a_regs = bool(re.search(r"wgmma\.mma_async\S*\s*\{[^}]*\},\s*\{", text))
        shutil.copy(ptx, dest / f"wq_gemv_{i}.ptx")
        print(f"ptx {i}: {ops} A in registers: {a_regs}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
