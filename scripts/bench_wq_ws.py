"""Int4/int8 GEMM on the H100: the Gluon kernels per config (``gluon_wq_gemm``, labels
``BMxBNw..s..``; ``gluon_wq_rs``, labels ``rs...``; at M <= 16 ``gluon_wq_decode``'s),
against cuBLAS fp16/bf16 ``F.linear``, dequantize + cuBLAS, at M <= 16 the Triton decode
kernel ``triton_wq_mma`` (autotuned), and (``--auto``) ``wq_matmul`` as dispatched;
CUDA-graph replays over 8 rotating weight copies.

    PYTHONPATH=. python scripts/bench_wq_ws.py [--shapes 8192x8192,4096x4096] \
        [--ms 64,128,256,512,1024,2048,4096] [--format int4-g128] [--dtype fp16] \
        [--auto] [--configs rs16x64w4s6k2c2,...] [--out ws.json]
    ncu ... python scripts/bench_wq_ws.py --shapes 8192x8192 --ms 256 --probe 128x128w4s4

Every config's output is first checked against ``wq_reference`` in a NaN-poisoned buffer
(relative error printed; a config above the tests' tolerance is reported and not timed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wq_graphs import FORMATS, ROTATE, graph_time_us  # noqa: E402
from quant_kernels import gluon_wq_gemm as ws  # noqa: E402
from quant_kernels import gluon_wq_decode as dec  # noqa: E402
from quant_kernels import gluon_wq_rs as rs  # noqa: E402
from quant_kernels import triton_wq_mma as mma  # noqa: E402
from quant_kernels.triton_wq import dequant_matmul, wq_matmul, wq_reference  # noqa: E402
from quant_kernels.wq_layout import dequantize_wq, pack_wq  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
MS = [64, 128, 256, 512, 1024, 2048, 4096]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_weight(n, k, group, bits, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gs = k if group == "K" else group
    gn = -(-k // gs)
    q = torch.randint(0, 1 << bits, (n, k), generator=g, device="cuda")
    s = (torch.rand(n, gn, generator=g, device="cuda") + 0.5) / (k ** 0.5 * (1 << bits))
    z = torch.randint(0, 1 << bits, (n, gn), generator=g, device="cuda").float()
    return pack_wq(q, s, -z * s, gs, bits, dtype=dtype)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--format", default="int4-g128", choices=sorted(FORMATS))
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--auto", action="store_true", help="also time wq_matmul as dispatched")
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels", default="ws,rs", help="which Gluon kernels' configs")
    ap.add_argument("--configs", default=None, help="time these config labels instead of "
                    "the kernels' candidate lists")
    ap.add_argument("--probe", default=None, metavar="BMxBNwWsS",
                    help="for ncu: launch only this config 3 times on the first shape and M")
    args = ap.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    bits, group, act = FORMATS[args.format]
    if act:
        raise SystemExit("act-order formats: time the unpermuted one (the kernel is the same)")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, {args.format} {args.dtype}")
    if args.probe:
        probe(args, dtype, bits, group)
        return
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        ws_ = [random_weight(n, k, group, bits, dtype, seed=i) for i in range(ROTATE)]
        dense = [dequantize_wq(w, dtype) for w in ws_]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ok, why = ws.can_run(x, ws_[0])
            if not ok:
                print(f"{k}x{n} M={m}: kernel refused: {why}")
                continue
            ref = wq_reference(x, ws_[0])
            outs = [torch.empty(m, n, device="cuda", dtype=dtype) for _ in range(ROTATE)]
            row = {"k": k, "n": n, "m": m, "configs": {}}
            row["cublas_us"] = graph_time_us(
                [lambda d=d, o=o: torch.matmul(x, d.t(), out=o) for d, o in zip(dense, outs)])
            row["dense_us"] = graph_time_us(
                [lambda w=w, o=o: dequant_matmul(x, w, o) for w, o in zip(ws_, outs)])
            if args.auto:
                row["auto_us"] = graph_time_us(
                    [lambda w=w, o=o: wq_matmul(x, w, out=o) for w, o in zip(ws_, outs)])
            if m <= mma.MAX_M and mma.can_run(x, ws_[0])[0]:
                row["mma_us"] = graph_time_us(
                    [lambda w=w, o=o: mma.mma_matmul(x, w, o) for w, o in zip(ws_, outs)])
            for label, fn in config_fns(args, x, ws_[0]).items():
                poison = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                try:
                    fn(x, ws_[0], poison)
                    torch.cuda.synchronize()
                except Exception as e:  # report and go on: one config must not end the run
                    print(f"  {label}: launch failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                err = rel_err(poison, ref) if not torch.isnan(poison).any() else float("nan")
                entry = {"err": err}
                if err < TOL[dtype]:
                    entry["us"] = graph_time_us(
                        [lambda w=w, o=o, f=fn: f(x, w, o) for w, o in zip(ws_, outs)])
                row["configs"][label] = entry
            timed = {lb: e["us"] for lb, e in row["configs"].items() if "us" in e}
            best = min(timed, key=timed.get) if timed else None
            cb = row["cublas_us"]
            line = (f"{k:>5}x{n:<5} M={m:<4} cuBLAS {cb:8.1f} us | dense {cb / row['dense_us']:.2f}x"
                    + (f" | auto {cb / row['auto_us']:.2f}x" if "auto_us" in row else "")
                    + (f" | mma {row['mma_us']:.1f} us = {cb / row['mma_us']:.2f}x"
                       if "mma_us" in row else ""))
            for fam in ("ws", "rs"):
                fam_t = {lb: t for lb, t in timed.items() if family(lb) == fam}
                if fam_t:
                    b = min(fam_t, key=fam_t.get)
                    line += f" | {fam} best {b} {fam_t[b]:.1f} us = {cb / fam_t[b]:.2f}x"
            bad = {lb: e["err"] for lb, e in row["configs"].items() if "us" not in e}
            if bad:
                line += f" | WRONG {bad}"
            print(line, flush=True)
            print("    " + " ".join(f"{lb}:{cb / t:.2f}x" for lb, t in timed.items()), flush=True)
            rows.append(row)
        del ws_, dense
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


def config_fns(args, x, w) -> dict:
    """Label -> launch of the configs to time: ``--configs``, else the candidates of the
    kernels in ``--kernels`` (at M <= 16, the decode configs)."""
    from functools import partial
    if args.configs:
        return {lb: partial(rs.launch, cfg=rs.RSConfig.from_label(lb)) if family(lb) == "rs"
                else partial(ws.launch, cfg=ws.WSConfig.from_label(lb))
                for lb in args.configs.split(",")}
    fns = dec.decode_candidates(x, w) if x.shape[0] <= 16 else ws.candidates(x, w)
    return {lb: fn for lb, fn in fns.items() if family(lb) in args.kernels.split(",")}


def family(label: str) -> str:
    """Which Gluon kernel a config label names: ``rs`` (gluon_wq_rs) or ``ws``."""
    return "rs" if label.startswith("rs") else "ws"


def probe(args, dtype, bits, group) -> None:
    """Three launches of one config (``--probe 128x128w4s4``), e.g. under ncu -s 2 -c 1."""
    k, n = map(int, args.shapes.split(",")[0].split("x"))
    m = int(args.ms.split(",")[0])
    mod = rs if family(args.probe) == "rs" else ws
    cfg = (rs.RSConfig if mod is rs else ws.WSConfig).from_label(args.probe)
    w = random_weight(n, k, group, bits, dtype, seed=0)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    for _ in range(3):
        mod.launch(x, w, out, cfg)
    torch.cuda.synchronize()
    print(f"{args.probe}: {k}x{n} M={m}, rel. error {rel_err(out, wq_reference(x, w)):.2e}")


if __name__ == "__main__":
    main()
