"""What bounds the two kernel targets still missed (issue 4), measured on the H100.

    PYTHONPATH=. python scripts/probe_limits.py m1 [--out m1.json]     # int4 g128, M = 1
    PYTHONPATH=. python scripts/probe_limits.py fp8 [--out fp8.json]   # W8A8 at M >= 1024

``m1`` (8192x8192 and the other shapes of the issue), CUDA-graph replays over 8 weight
copies, cuBLAS fp16 in the same run:

* ``read``: plain reads of the packed words, 16-byte loads, with exactly the programs,
  warps, iterations and one-iteration lookahead of ``triton_wq_mma`` -- once at its
  addresses (16-byte pieces of 16 rows, the warps splitting K) and once at contiguous
  addresses: the cost of its access pattern, and its floor without any arithmetic;
* ``mma``: ``triton_wq_mma`` per config as in main, then with the activation-sum MMAs
  removed, then with those and every other weight MMA removed (wrong results, timing only):
  whether its ``mma.sync`` count bounds it;
* ``rs``: ``gluon_wq_rs`` decode configs with the dequantization replaced by one ``xor``
  (wrong results, timing only; run in a child process with its own Triton cache): whether
  its unpacking bounds it.

``fp8``: bf16 ``F.linear`` against the W8A8 path and its two parts (the per-token
quantization pass, ``torch._scaled_mm`` with row-wise scales), and ``_scaled_mm`` with
per-tensor scales (what cuBLAS's fastest FP8 GEMM would cost without row scales).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wq_graphs import ROTATE, graph_time_us  # noqa: E402
from bench_wq_ws import random_weight  # noqa: E402

SHAPES = ((8192, 8192), (4096, 14336), (14336, 4096))
MMA_SPECS = ("4:2", "4:1", "8:2", "8:1")
RS_LABELS = ("rs8x64w4s6k4c4", "rs8x128w4s6k4c2", "rs8x128w4s6k2c2", "rs8x128w8s6k4c2",
             "rs8x256w8s6k4", "rs8x64w4s6k2c4")


# ----------------------------------------------------------------------------- reads
@triton.jit
def _offs(p, i, w, t, r, q, j, v, ROWB: tl.constexpr, WARPS: tl.constexpr,
          CONTIG: tl.constexpr, PIECES: tl.constexpr):
    """Element offsets of iteration ``i``'s PIECES 16-byte pieces per thread."""
    if CONTIG:
        base = p * (4 * ROWB) + i * (32 * WARPS * PIECES) + j[None, :] * (32 * WARPS) + t[:, None]
    else:
        # as triton_wq_mma: piece j is slab (warp's first + PIECES/2 * i + j // 2), row r
        # (+ 8 for odd j), words 4q..4q+3 of the slab
        slab = w[:, None] * (ROWB // 16 // WARPS) + (PIECES // 2) * i + j[None, :] // 2
        row = p * 16 + r[:, None] + 8 * (j[None, :] % 2)
        base = row * (ROWB // 4) + slab * 4 + q[:, None]
    return (base * 4)[:, :, None] + v[None, None, :]


@triton.jit
def _read_probe(src, dst, ITERS, ROWB: tl.constexpr, WARPS: tl.constexpr,
                CONTIG: tl.constexpr, PIECES: tl.constexpr):
    # a program's bytes: 16 weight rows (ROWB int32 words each); one iteration of lookahead
    p = tl.program_id(0)
    t = tl.arange(0, 32 * WARPS)
    lane = t % 32
    w = t // 32
    r = lane // 4
    q = lane % 4
    j = tl.arange(0, PIECES)
    v = tl.arange(0, 4)
    acc = tl.zeros([32 * WARPS, PIECES, 4], dtype=tl.int32)
    cur = tl.load(src + _offs(p, 0, w, t, r, q, j, v, ROWB, WARPS, CONTIG, PIECES),
                  cache_modifier=".cg")
    for i in tl.range(1, ITERS + 1, loop_unroll_factor=1):
        nxt = tl.load(src + _offs(p, tl.minimum(i, ITERS - 1), w, t, r, q, j, v, ROWB, WARPS,
                                  CONTIG, PIECES), cache_modifier=".cg")
        acc ^= cur
        cur = nxt
    tl.store(dst + p * 32 * WARPS + t, tl.xor_sum(tl.xor_sum(acc, axis=2), axis=1))


def read_probes(k: int, n: int, res: dict) -> None:
    rowb = k // 8
    bufs = [torch.randint(0, 1 << 30, (n * rowb,), device="cuda", dtype=torch.int32)
            for _ in range(ROTATE)]
    dst = torch.empty(n // 16 * 256, device="cuda", dtype=torch.int32)
    for warps, pieces in ((4, 4), (8, 4), (4, 2), (8, 2)):   # pieces 4 = two slabs (PAIR 2)
        iters = rowb // 16 // warps // (pieces // 2)
        for contig in (0, 1):
            t = graph_time_us([lambda b=b: _read_probe[(n // 16,)](
                b, dst, iters, rowb, warps, contig, pieces, num_warps=warps) for b in bufs])
            key = f"{k}x{n} read w{warps} {pieces // 2} slab(s) {'contig' if contig else 'mma'}"
            res[key] = round(t, 2)
            print(key, res[key], flush=True)


# ----------------------------------------------------------------------------- MMA
def _strip(src: str, variant: str) -> str:
    """``triton_wq_mma_ptx.ptx_block`` without the activation-sum MMAs (``nox``), and
    also without every other weight MMA (``half``)."""
    lines = [ln for ln in src.split("\n") if "{one, one, one, one}" not in ln]
    if variant == "half":
        mmas = [i for i, ln in enumerate(lines) if ln.startswith("mma.sync")]
        drop = set(mmas[1::2])
        lines = [ln for i, ln in enumerate(lines) if i not in drop]
    return "\n".join(lines)


def mma_probes(k: int, n: int, res: dict) -> None:
    from quant_kernels import triton_wq_mma as mm
    from quant_kernels.triton_wq_mma_ptx import ptx_block
    ws_ = [random_weight(n, k, 128, 4, torch.float16, seed=i) for i in range(ROTATE)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in ws_]
    for variant in ("main", "nox", "half"):
        mm.ptx_block = ptx_block if variant == "main" else (
            lambda *a, v=variant: _strip(ptx_block(*a), v))
        for spec in MMA_SPECS:
            wp, pr = map(int, spec.split(":"))
            cfg = mm._cfg(wp, pr)
            t = graph_time_us([lambda w=w, o=o: mm.mma_matmul(x, w, o, config=cfg)
                               for w, o in zip(ws_, outs)])
            res[f"{k}x{n} mma {spec} {variant}"] = round(t, 2)
            print(f"{k}x{n} mma {spec} {variant}", round(t, 2), flush=True)
    mm.ptx_block = ptx_block


def rs_probes(k: int, n: int, cheap: bool, res: dict) -> None:
    from quant_kernels import gluon_wq_rs as rs
    if cheap:  # before the first compile: the kernel reads it as a constexpr global
        rs._PTX_F16 = rs.gl.constexpr("xor.b32 $0, $1, $3;")
    ws_ = [random_weight(n, k, 128, 4, torch.float16, seed=i) for i in range(ROTATE)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in ws_]
    for label in RS_LABELS:
        cfg = rs.RSConfig.from_label(label)
        t = graph_time_us([lambda w=w, o=o: rs.launch(x, w, o, cfg) for w, o in zip(ws_, outs)])
        key = f"{k}x{n} rs {label} {'xor' if cheap else 'main'}"
        res[key] = round(t, 2)
        print(key, res[key], flush=True)


def run_m1(args) -> dict:
    res = {}
    if args.rs_child:
        for k, n in SHAPES:
            rs_probes(k, n, args.rs_child == "xor", res)
        return res
    from quant_kernels import triton_wq_mma as mm
    for k, n in SHAPES:
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(ROTATE)]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        res[f"{k}x{n} cublas"] = round(graph_time_us([lambda d=d: F.linear(x, d)
                                                      for d in dense]), 2)
        del dense
        ws_ = [random_weight(n, k, 128, 4, torch.float16, seed=i) for i in range(ROTATE)]
        outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in ws_]
        res[f"{k}x{n} mma autotuned"] = round(graph_time_us(
            [lambda w=w, o=o: mm.mma_matmul(x, w, o) for w, o in zip(ws_, outs)]), 2)
        del ws_
        print(f"{k}x{n}", res[f"{k}x{n} cublas"], res[f"{k}x{n} mma autotuned"], flush=True)
        read_probes(k, n, res)
        mma_probes(k, n, res)
    for variant in ("main", "xor"):   # a child each: own Triton cache, own constexpr
        env = dict(os.environ, TRITON_CACHE_DIR=f"/tmp/probe_rs_{variant}")
        out = subprocess.run([sys.executable, __file__, "m1", "--rs-child", variant,
                              "--out", f"/tmp/probe_rs_{variant}.json"], env=env)
        if out.returncode == 0:
            res.update(json.loads(Path(f"/tmp/probe_rs_{variant}.json").read_text()))
    return res


# ----------------------------------------------------------------------------- FP8
def run_fp8(args) -> dict:
    from quant_kernels.fp8_act import quant_per_token
    from quantrt.quant.fp8_kernels import w8a8_matmul
    res = {}
    for k, n in ((4096, 4096), (14336, 4096), (8192, 8192)):
        wd = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
              for _ in range(4)]
        w8 = [(d.float() / (d.abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn)
              for d in wd]
        wsc = [(d.abs().amax(1).float() / 448).reshape(1, -1) for d in wd]
        one = torch.ones((), device="cuda")
        for m in (1024, 2048, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, s = quant_per_token(x)
            r = {"bf16": graph_time_us([lambda d=d: F.linear(x, d) for d in wd * 2]),
                 "w8a8": graph_time_us([lambda i=i: w8a8_matmul(x, w8[i].t(), wsc[i])
                                        for i in range(4)] * 2),
                 "quant": graph_time_us([lambda: quant_per_token(x)] * 8),
                 "mm_rowwise": graph_time_us(
                     [lambda i=i: torch._scaled_mm(xq, w8[i].t(), scale_a=s, scale_b=wsc[i],
                                                   out_dtype=torch.bfloat16,
                                                   use_fast_accum=True) for i in range(4)] * 2),
                 "mm_tensorwise": graph_time_us(
                     [lambda i=i: torch._scaled_mm(xq, w8[i].t(), scale_a=one, scale_b=one,
                                                   out_dtype=torch.bfloat16,
                                                   use_fast_accum=True) for i in range(4)] * 2)}
            r = {a: round(b, 1) for a, b in r.items()}
            r["speedup"] = round(r["bf16"] / r["w8a8"], 3)
            r["quant_GBps"] = round(m * k * 3 / r["quant"] / 1e3)   # bf16 in, fp8 out
            res[f"{k}x{n} M{m}"] = r
            print(f"{k}x{n} M={m}", r, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["m1", "fp8"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rs-child", default=None, choices=["main", "xor"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.rs_child:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}", flush=True)
    res = run_m1(args) if args.what == "m1" else run_fp8(args)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
