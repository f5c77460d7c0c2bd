"""GPU sweep of WQ kernel configs (and the FP8 W8A8 path) under CUDA graphs, to choose
the tuned config lists, the kernel per M and ``DEQUANT_GEMM_MIN_M`` from measurements.

For int4 group-128 weights and each (K, N, M) it checks every candidate against
``wq_reference`` (fresh random data, NaN-poisoned output) and times it as the median
per-call time of a CUDA graph that runs it over 8 weight copies (larger than L2), next to
cuBLAS fp16 ``F.linear`` timed the same way.  Candidates:

  gemv:<cfg>  weight-stationary kernel (FMA path BLOCK_M=1, tl.dot path BLOCK_M=16), M <= 16
  swap:<cfg>  the same kernel with BLOCK_M > 16 (dequantized weight is the MMA's A operand)
  gemm:<cfg>  the x-stationary fused GEMM (triton_wq_gemm)
  deq         dequantize to fp16 + cuBLAS (and deq_only: the dequant kernel alone)

FP8: bf16 F.linear against ``w8a8_matmul`` (Triton per-token quant + torch._scaled_mm),
the older four-pass torch quantization + _scaled_mm, and _scaled_mm alone.

    PYTHONPATH=. python scripts/sweep_wq.py --out $OUT/sweep.json [--budget 280]
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

from bench_kernels import copy_bandwidth, make_weight, rel_err  # noqa: E402
from bench_wq_graphs import graph_time_us  # noqa: E402
from quant_kernels import triton_wq as tw  # noqa: E402
from quant_kernels import triton_wq_gemm as gm  # noqa: E402
from quant_kernels import triton_wq_gemv as gv  # noqa: E402
from quant_kernels.fp8_act import quant_per_token, quant_per_token_ref  # noqa: E402
from quantrt.quant.fp8_kernels import w8a8_matmul  # noqa: E402

ROTATE = 8


def gv_cfg(bm, bn, bk, sk, warps=4, stages=3):
    return gv._cfg(bm, bn, bk, sk, warps, stages)


# Second sweep (the first one's winners and their neighbours; it had no split-K for
# M > 16, which left 8192x8192 at M = 32..256 with 128 programs for 132 SMs).
GEMV = [gv_cfg(1, bn, 128, sk, w, 1) for bn, sk, w in
        ((64, 4, 4), (64, 8, 4), (32, 8, 4), (128, 4, 8), (64, 4, 8), (32, 4, 2), (64, 2, 2),
         (16, 2, 2), (32, 4, 4))] + \
       [gv_cfg(16, bn, 128, sk, w, st) for bn, sk, w, st in
        ((64, 4, 4, 3), (64, 8, 4, 3), (64, 4, 4, 4), (32, 4, 4, 3), (32, 8, 4, 3),
         (64, 4, 8, 3), (128, 8, 8, 3), (128, 4, 8, 4))]
SWAP = [gv_cfg(bm, bn, bk, sk, w, st) for bm, bn, bk, sk, w, st in
        ((32, 64, 128, 1, 4, 4), (32, 64, 128, 2, 4, 4), (32, 64, 128, 4, 4, 4),
         (64, 64, 128, 1, 4, 4), (64, 64, 128, 2, 4, 4), (64, 64, 128, 4, 4, 4),
         (64, 128, 128, 2, 8, 3), (128, 64, 128, 1, 4, 3), (128, 64, 128, 2, 4, 3),
         (128, 128, 64, 2, 8, 4))]
GEMM = [gm._cfg(bm, bn, bk, sk, w, st, 8) for bm, bn, bk, sk, w, st in
        ((64, 64, 128, 1, 4, 4), (64, 64, 128, 2, 4, 4), (64, 64, 128, 4, 4, 4),
         (32, 64, 128, 2, 4, 4), (32, 64, 128, 4, 4, 4), (64, 128, 128, 2, 4, 3),
         (128, 128, 64, 1, 8, 3), (128, 128, 64, 2, 8, 3), (128, 64, 128, 2, 4, 4))]


def name(kind, c):
    k = c.kwargs
    return (f"{kind}:{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}s{k['SPLIT_K']}"
            f"w{c.num_warps}st{c.num_stages}" + (f"g{k['GROUP_M']}" if "GROUP_M" in k else ""))


def candidates(m):
    if m <= 16:
        return [(name("gemv", c), lambda x, w, o, c=c: gv.run_config(x, w, o, c))
                for c in GEMV if c.kwargs["BLOCK_M"] >= m
                and (c.kwargs["BLOCK_M"] > 1 or m == 1)]
    out = [(name("swap", c), lambda x, w, o, c=c: gv.run_config(x, w, o, c))
           for c in SWAP if c.kwargs["BLOCK_M"] <= max(32, 2 * m)]
    out += [(name("gemm", c), lambda x, w, o, c=c: gm.gemm(x, w, o, config=c))
            for c in GEMM if c.kwargs["BLOCK_M"] <= max(32, 2 * m)]
    out.append(("deq", lambda x, w, o: tw.dequant_matmul(x, w, o)))
    return [(label, fn) for label, fn in out
            if not (m > 256 and ":" in label and "s1w" not in label)]


def sweep_shape(k, n, ms, rows, deadline, copy_bw):
    ws = [make_weight(n, k, 4, 128, seed=i) for i in range(ROTATE)]
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
             for _ in range(4)]
    wbytes = ws[0].nbytes
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = tw.wq_reference(x, ws[0])
        outs = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(ROTATE)]
        fp16 = graph_time_us([lambda d=d: F.linear(x, d) for d in dense * 2])
        base = dict(K=k, N=n, M=m, fp16_us=fp16)
        rows.append({**base, "kind": "fp16", "us": fp16})
        if m > 16:
            t = graph_time_us([lambda w=w: gm.dequantize(w, torch.float16) for w in ws])
            rows.append({**base, "kind": "deq_only", "us": t})
        for label, fn in candidates(m):
            if time.monotonic() > deadline:
                print(f"deadline: skip rest of K={k} N={n} M={m}", flush=True)
                return
            row = {**base, "kind": label}
            try:
                poison = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
                fn(x, ws[0], poison)
                torch.cuda.synchronize()
                row["nan"] = bool(torch.isnan(poison).any())
                row["rel_err"] = rel_err(poison, ref)
                fn(x, ws[1], outs[1])  # second launch: split-K counters were re-armed
                row["rel_err2"] = rel_err(outs[1], tw.wq_reference(x, ws[1]))
                row["us"] = graph_time_us([lambda w=w, o=o: fn(x, w, o)
                                           for w, o in zip(ws, outs)])
                row["speedup"] = fp16 / row["us"]
                row["copy_frac"] = (wbytes + 2 * m * (k + n)) / row["us"] / 1e3 / copy_bw
            except Exception as e:  # one bad config must not hide the rest
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
        best = min((r for r in rows if r["K"] == k and r["N"] == n and r["M"] == m
                    and "us" in r and r["kind"] not in ("fp16", "deq_only")
                    and not r.get("nan") and r.get("rel_err", 1) < 2e-3),
                   key=lambda r: r["us"], default=None)
        if best:
            print(f"K={k} N={n} M={m}: fp16 {fp16:.1f} us, best {best['kind']} "
                  f"{best['us']:.1f} us ({best['speedup']:.2f}x)", flush=True)
    del ws, dense
    torch.cuda.empty_cache()


def sweep_fp8(rows, deadline):
    for k, n in ((8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)):
        wd = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
              for _ in range(2)]
        w8 = [(d.float() / (d.abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn)
              for d in wd]
        wsc = [(d.abs().amax(1).float() / 448).reshape(1, -1) for d in wd]
        for m in (1024, 2048, 4096):
            if time.monotonic() > deadline:
                return
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = dict(K=k, N=n, M=m)
            bf16 = graph_time_us([lambda d=d: F.linear(x, d) for d in wd * 4])
            ref = F.linear(x.float(), w8[0].float() * wsc[0].t())
            y = w8a8_matmul(x, w8[0].t(), wsc[0])
            xq, s = quant_per_token_ref(x)
            row = {**base, "bf16_us": bf16, "rel_err": rel_err(y, ref),
                   "quant_exact": bool(torch.equal(quant_per_token(x)[0].view(torch.uint8),
                                                   xq.view(torch.uint8)))}
            row["w8a8_us"] = graph_time_us([lambda i=i: w8a8_matmul(x, w8[i].t(), wsc[i])
                                            for i in (0, 1) * 4])

            def torch_quant(i):
                xq, s = quant_per_token_ref(x)
                return torch._scaled_mm(xq, w8[i].t(), scale_a=s, scale_b=wsc[i],
                                        out_dtype=torch.bfloat16)
            row["w8a8_torchquant_us"] = graph_time_us([lambda i=i: torch_quant(i)
                                                       for i in (0, 1) * 4])
            row["scaled_mm_only_us"] = graph_time_us(
                [lambda i=i: torch._scaled_mm(xq, w8[i].t(), scale_a=s, scale_b=wsc[i],
                                              out_dtype=torch.bfloat16) for i in (0, 1) * 4])
            row["scaled_mm_fast_accum_us"] = graph_time_us(
                [lambda i=i: torch._scaled_mm(xq, w8[i].t(), scale_a=s, scale_b=wsc[i],
                                              out_dtype=torch.bfloat16, use_fast_accum=True)
                 for i in (0, 1) * 4])
            # error of the GEMM itself, against fp32 math on the same fp8 operands
            exact = (xq.float() * s) @ (w8[0].float() * wsc[0].t()).t()
            for fast in (False, True):
                yq = torch._scaled_mm(xq, w8[0].t(), scale_a=s, scale_b=wsc[0],
                                      out_dtype=torch.bfloat16, use_fast_accum=fast)
                row[f"gemm_err_fast{int(fast)}"] = rel_err(yq, exact)
            row["act_quant_err"] = rel_err(exact, F.linear(x.float(), w8[0].float() * wsc[0].t()))
            row["w8a8_fast_us"] = graph_time_us(
                [lambda i=i: w8a8_matmul(x, w8[i].t(), wsc[i], fast_accum=True)
                 for i in (0, 1) * 4])
            row["speedup"] = bf16 / row["w8a8_us"]
            row["speedup_fast"] = bf16 / row["w8a8_fast_us"]
            rows.append(row)
            print(f"fp8 K={k} N={n} M={m}: bf16 {bf16:.1f} us, w8a8 {row['w8a8_us']:.1f} "
                  f"({row['speedup']:.2f}x), torch-quant {row['w8a8_torchquant_us']:.1f}, "
                  f"mm only {row['scaled_mm_only_us']:.1f}, fast accum "
                  f"{row['scaled_mm_fast_accum_us']:.1f}, w8a8 fast {row['w8a8_fast_us']:.1f} "
                  f"({row['speedup_fast']:.2f}x), gemm err {row['gemm_err_fast0']:.1e}/"
                  f"{row['gemm_err_fast1']:.1e} (fast), act quant err {row['act_quant_err']:.1e}",
                  flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="sweep.json")
    ap.add_argument("--budget", type=float, default=280.0)
    args = ap.parse_args()
    start = time.monotonic()
    deadline = start + args.budget
    copy_bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    meta = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                copy_GBps=copy_bw)
    print(json.dumps(meta), flush=True)
    rows, fp8 = [], []
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(dict(meta, rows=rows, fp8=fp8,
                                       seconds=time.monotonic() - start), indent=1))
    sweep_shape(8192, 8192, [1, 16, 32, 64, 128, 256, 512], rows, deadline - 60, copy_bw)
    save()
    sweep_fp8(fp8, deadline - 35)
    save()
    for kn in ((4096, 14336), (14336, 4096), (4096, 4096)):
        sweep_shape(*kn, [1, 16, 64, 256], rows, deadline, copy_bw)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
