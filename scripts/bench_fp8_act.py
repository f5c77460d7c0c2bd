"""The per-token FP8 activation pass (``quant_kernels.fp8_act``) per launch config, on the
GPU: CUDA-graph time and GB/s (bf16 in, e4m3 out, fp32 scales) against a device copy of
the same bytes in the same run; every config's output checked bit for bit against the
torch expression first.

    PYTHONPATH=. python scripts/bench_fp8_act.py [--ks 4096,8192,14336] [--ms 1024,4096] \
        [--out fp8_act.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wq_graphs import graph_time_us  # noqa: E402
from quant_kernels import fp8_act  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="4096,8192,14336")
    ap.add_argument("--ms", default="1024,4096")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    rows = []
    for k in map(int, args.ks.split(",")):
        for m in map(int, args.ms.split(",")):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            q = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn)
            s = torch.empty(m, 1, device="cuda", dtype=torch.float32)
            ref_q, ref_s = fp8_act.quant_per_token_ref(xs[0])
            nbytes = m * k * 3 + m * 4
            src = torch.empty(nbytes // 2, device="cuda", dtype=torch.uint8)
            dst = torch.empty_like(src)
            copy = graph_time_us([lambda: dst.copy_(src)] * 4)   # reads + writes nbytes
            row = {"k": k, "m": m, "copy_us": copy, "configs": {}}
            pw = triton.next_power_of_2(k)
            cands = [(pw, True, w) for w in (4, 8, 16, 32)]
            cands += [(b, False, w) for b in (1024, 2048, 4096) for w in (4, 8, 16)
                      if b < k and b // (32 * w) >= 4]
            cands.append(("default", None, None))
            for block, one, warps in cands:
                if block == "default":
                    fn = lambda x: fp8_act.quant_per_token(x)  # noqa: E731
                    label = "default"
                else:
                    fn = lambda x, b=block, o=one, w=warps: fp8_act.launch(  # noqa: E731
                        x, q, s, None, b, o, w)
                    label = f"{'one' if one else 'two'}-pass b{block} w{warps}"
                q.fill_(0)
                got = fn(xs[0])
                gq, gs = got if block == "default" else (q, s)
                exact = (torch.equal(gq.view(torch.uint8), ref_q.view(torch.uint8))
                         and torch.equal(gs, ref_s))
                t = graph_time_us([lambda x=x: fn(x) for x in xs] * 2)
                row["configs"][label] = {"us": t, "GBps": nbytes / t / 1e3,
                                         "of_copy": copy / t, "exact": exact}
                print(f"K={k} M={m} {label}: {t:.1f} us, {nbytes / t / 1e3:.0f} GB/s, "
                      f"{copy / t:.0%} of copy, exact={exact}", flush=True)
            rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
