"""Benchmark: the Triton dequant of the GGML types without a fused kernel
(quant_kernels/triton_ggml_dequant.py) on the GPU.

Per type and weight shape (K, N) in {(4096, 4096), (4096, 14336)} (weight ``[N, K]``),
after a correctness check on the same bytes (fp32 output bit-exact with
``gguf_ref.dequantize``, fp16 equal to it rounded), it times in one run:

  deq     the Triton dequant alone into fp16; GB/s counts GGML bytes read + fp16 written,
          "%copy" is that over a device-to-device copy measured in the same run
  ours    dequant + F.linear at M = 1, 16, 256 (what TritonDequantKernel runs)
  fp16    F.linear with a dense fp16 weight (cuBLAS), same M
  old     the path before: gguf_ref.dequantize on the device (the codebook types go
          through the CPU) + F.linear, eager, a few calls (it takes up to seconds)

GPU times are medians of CUDA-graph replays over rotating weights and outputs (more
bytes than the L2 holds; CUDA events), so launch overhead drops out.  ``--sweep`` times
the dequant at several ``values_per_program`` per type and shape instead, to choose
``VALUES_PER_PROGRAM``.

``--cpu-check`` runs the same code on tiny shapes under TRITON_INTERPRET=1 on the CPU
with a wall-clock timer: it shows the script works, its times mean nothing.

    PYTHONPATH=. python scripts/bench_ggml_dequant.py [--types IQ2_XXS,...] [--sweep]
        [--budget 500] [--out ggml_dequant.json] [--cpu-check]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(4096, 4096), (4096, 14336)]
CPU_SHAPES = [(512, 17)]
MS = [1, 16, 256]
ROTATE_BYTES = 200 << 20  # > 3x the H100's 50 MB L2
MAX_COPIES = 8
SWEEP_VPP = [512, 1024, 2048, 4096, 8192]
OLD_REPS = 3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="ggml_dequant.json", help="JSON file, or a folder to "
                    "put ggml_dequant.json in")
    ap.add_argument("--types", default="", help="comma-separated GGML type names (default all)")
    ap.add_argument("--sweep", action="store_true", help="time values_per_program choices")
    ap.add_argument("--no-old", action="store_true", help="skip the slow old-path timing")
    ap.add_argument("--budget", type=float, default=500.0,
                    help="seconds after which the remaining types are skipped")
    ap.add_argument("--cpu-check", action="store_true",
                    help="tiny shapes on the CPU under the Triton interpreter")
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.cpu_check:  # read when the kernels are decorated: before they are imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from quant_kernels import gguf_ref  # noqa: E402
from quant_kernels import triton_ggml_dequant as tgd  # noqa: E402
from tests.test_gguf_ref import _random_blocks  # noqa: E402  (one block generator)


def cuda_time_us(fns) -> float:
    from bench_wq_graphs import graph_time_us

    return graph_time_us(fns)


def cpu_time_us(fns) -> float:
    """Interpreter only: wall time per call, to show the path runs."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        times.append((time.perf_counter() - t0) / len(fns) * 1e6)
    return min(times)


def eager_time_us(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(dev) -> float:
    src = torch.empty(1 << 30 if dev.type == "cuda" else 1 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    if dev.type != "cuda":
        return 2 * src.numel() / cpu_time_us([lambda: dst.copy_(src)]) / 1e3
    return 2 * src.numel() / cuda_time_us([lambda: dst.copy_(src)]) / 1e3  # GB/s


def check(raw_cpu, raw, qtype, k) -> dict:
    """Bit-exactness of the Triton dequant on these bytes, before any timing."""
    want = gguf_ref.dequantize(raw_cpu, int(qtype))
    out = {}
    for dtype in (torch.float32, torch.float16):
        got = torch.full(want.shape, float("nan"), dtype=dtype, device=raw.device)
        tgd.dequantize(raw, int(qtype), k, dtype, out=got)
        ref = want.to(dtype)
        out[f"exact_{str(dtype)[6:]}"] = bool(torch.equal(got.cpu(), ref))
    return out


def rotating(make, nbytes: int) -> list:
    return [make() for _ in range(max(2, min(MAX_COPIES, -(-ROTATE_BYTES // nbytes))))]


def run_shape(qtype, k, n, dev, timer, copy_bw, old: bool, sync) -> list[dict]:
    block, size = gguf_ref.block_info(qtype)
    raw_cpu = torch.from_numpy(_random_blocks(qtype, n, k // block, seed=int(qtype)))
    raw0 = raw_cpu.to(dev)
    base = dict(type=qtype.name, K=k, N=n, **check(raw_cpu, raw0, qtype, k))
    if not (base["exact_float32"] and base["exact_float16"]):
        return [dict(base, error="not bit-exact: not timed")]
    raws = [raw0] + rotating(lambda: raw0.clone(), raw0.numel())[1:]
    outs = rotating(lambda: torch.empty(n, k, dtype=torch.float16, device=dev), n * k * 2)
    deq_us = timer([lambda r=r, o=o: tgd.dequantize(r, int(qtype), k, torch.float16, out=o)
                    for r, o in zip(raws, outs)])
    gbps = (raw0.numel() + n * k * 2) / deq_us / 1e3
    base.update(deq_us=deq_us, deq_GBps=gbps, deq_copy_frac=gbps / copy_bw,
                bits_per_weight=8 * size / block)
    del outs
    dense = rotating(lambda: torch.randn(n, k, device=dev).half() / k ** 0.5, n * k * 2)
    rows = []
    for m in MS if dev.type == "cuda" else MS[:2]:
        x = torch.randn(m, k, device=dev).half()
        row = dict(base, M=m)
        row["ours_us"] = timer([lambda r=r: F.linear(x, tgd.dequantize(
            r, int(qtype), k, torch.float16)) for r in raws])
        row["fp16_us"] = timer([lambda w=w: F.linear(x, w) for w in dense])
        row["vs_fp16"] = row["fp16_us"] / row["ours_us"]
        if old:
            row["old_us"] = eager_time_us(lambda: F.linear(x, gguf_ref.dequantize(
                raw0, int(qtype), (n, k), torch.float16)), OLD_REPS, sync)
            row["speedup_vs_old"] = row["old_us"] / row["ours_us"]
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def sweep_shape(qtype, k, n, dev, timer) -> dict:
    block, _ = gguf_ref.block_info(qtype)
    raw0 = torch.from_numpy(_random_blocks(qtype, n, k // block, seed=1)).to(dev)
    raws = [raw0] + rotating(lambda: raw0.clone(), raw0.numel())[1:]
    outs = rotating(lambda: torch.empty(n, k, dtype=torch.float16, device=dev), n * k * 2)
    res = {}
    for vpp in SWEEP_VPP:
        res[vpp] = timer([lambda r=r, o=o: tgd.dequantize(r, int(qtype), k, torch.float16, out=o,
                                                          values_per_program=vpp)
                          for r, o in zip(raws, outs)])
    print(f"{qtype.name} K={k} N={n}: " + " | ".join(f"{v}: {us:.1f} us" for v, us in res.items()),
          flush=True)
    return dict(type=qtype.name, K=k, N=n, us_by_values_per_program=res)


HEADER = ("| type | bpw | K | N | deq us | deq GB/s | %copy | M | ours us | fp16 us | "
          "ours/fp16 speed | old us | vs old |\n|" + "---|" * 13)


def _line(r) -> str:
    old = (f"{r['old_us']:.0f} | {r['speedup_vs_old']:.1f}x" if "old_us" in r else "- | -")
    return (f"| {r['type']} | {r['bits_per_weight']:.2f} | {r['K']} | {r['N']} | "
            f"{r['deq_us']:.1f} | {r['deq_GBps']:.0f} | {100 * r['deq_copy_frac']:.0f}% | "
            f"{r['M']} | {r['ours_us']:.1f} | {r['fp16_us']:.1f} | {r['vs_fp16']:.2f}x | {old} |")


def main() -> int:
    args = ARGS
    if not args.cpu_check and not torch.cuda.is_available():
        print("bench_ggml_dequant.py needs a CUDA GPU (or --cpu-check)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.cpu_check else "cuda")
    timer = cpu_time_us if args.cpu_check else cuda_time_us
    sync = (lambda: None) if args.cpu_check else torch.cuda.synchronize
    types = [Q[t] for t in args.types.split(",") if t] or list(tgd.SUPPORTED)
    shapes = CPU_SHAPES if args.cpu_check else SHAPES
    start = time.monotonic()
    name = "CPU (Triton interpreter)" if args.cpu_check else torch.cuda.get_device_name()
    copy_bw = copy_bandwidth(dev)
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {copy_bw:.0f} GB/s", flush=True)
    rows, skipped = [], []
    if not args.sweep:
        print(HEADER, flush=True)
    for qtype in types:
        for k, n in shapes:
            if time.monotonic() - start > args.budget:
                skipped.append(f"{qtype.name} K={k} N={n}")
                continue
            try:
                if args.sweep:
                    rows.append(sweep_shape(qtype, k, n, dev, timer))
                else:
                    rows += run_shape(qtype, k, n, dev, timer, copy_bw, not args.no_old, sync)
            except Exception as e:  # one broken type must not hide the others
                rows.append(dict(type=qtype.name, K=k, N=n, error=f"{type(e).__name__}: {e}"[:300]))
                print(f"| {qtype.name} | K={k} N={n} | ERROR {rows[-1]['error']} |", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if skipped:
        print(f"time budget reached: skipped {', '.join(skipped)}", flush=True)
    result = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                  copy_GBps=copy_bw, values_per_program=tgd.VALUES_PER_PROGRAM,
                  seconds=round(time.monotonic() - start, 1), skipped=skipped, rows=rows)
    out = Path(args.out) / "ggml_dequant.json" if Path(args.out).is_dir() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
