"""Decode (M <= 16) on Hopper: ``gluon_wq_rs``'s register-operand GEMM with small tiles.

``triton_wq_mma`` keeps every byte it has in flight in registers, and 88-90 of them per
thread cap it at 16 warps per SM: it reaches ~76% of what a plain read of the weight
achieves (BENCHMARKS.md, session 8).  Here the loader warp's TMA copies fill a ring in
shared memory, so the bytes in flight cost no registers, and the MMA warpgroup
dequantizes each slot straight into wgmma's A fragment, with the activations as a
``BM = 8`` or ``16``-column B operand (rows past M are TMA's zero fill).  With one
64-row tile per CTA a 8192-row layer has only 128 CTAs, one warpgroup per SM; so K is
split 2-8 ways (``RSConfig.split``: the last split to finish sums the parts in the same
launch).

``wq_matmul`` times ``decode_matmul`` against the Triton decode kernels per shape.
"""
from __future__ import annotations

import functools

import torch

from .gluon_wq_rs import RSConfig, can_run, fits, k_steps, launch
from .wq_layout import WQWeight

# Decode (M <= 16, wgmma N = 8 or 16): 64-128 weight rows per CTA and K split 2-8 ways, so
# that every SM runs 2-4 CTAs (8192x8192 has only 128 tiles of 64 rows for 132 SMs).  The
# winners of a sweep of 16 configs on the H100 (BENCHMARKS.md, session 11), each the best
# at M = 1 or 16 on one of the four benchmark shapes.  Deeper rings did not help (6 vs
# 10-12 slots); more CTAs per SM did (1 CTA: 1.74x at 8192x8192 M=1; 4: 2.21x).
DECODE_CONFIGS = tuple(RSConfig(*c) for c in (
    (16, 64, 4, 8, 3, 3), (16, 128, 4, 6, 2, 4), (16, 64, 4, 6, 4, 4), (16, 128, 4, 6, 2, 2),
    (16, 64, 4, 6, 4, 8), (16, 128, 4, 6, 2, 8), (8, 128, 4, 6, 2, 4), (8, 64, 4, 6, 4, 4)))

def decode_candidates(x: torch.Tensor, w: WQWeight) -> dict:
    """Label -> launch of every decode config that takes (x, w): one M tile (``BM >=
    M``), no more K splits than K has steps."""
    return {c.label: functools.partial(launch, cfg=c) for c in DECODE_CONFIGS
            if c.block_m >= x.shape[0] and c.split <= k_steps(w) and fits(c)}


def decode_matmul(x: torch.Tensor, w: WQWeight, out: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for M <= 16 with the decode config timed fastest for this shape and M
    bucket (``triton_wq_tile.timed_choice``; inside a CUDA-graph capture an untimed first
    call takes the first candidate, as ``gluon_wq_gemm.ws_matmul`` does)."""
    from .triton_wq_tile import timed_choice
    key = ("rs-decode", x.shape[0] <= 8)     # BM = 8 configs only take M <= 8
    fns = w.plans.get(key)
    if fns is None:
        fns = w.plans[key] = decode_candidates(x, w)
    if not fns:
        raise ValueError(f"no register-operand decode config takes M={x.shape[0]}, "
                         f"K={w.k} (call can_run_decode first)")
    label = timed_choice(x, w, out, fns, 16, next(iter(fns)))
    return fns[label](x, w, out)


def can_run_decode(x: torch.Tensor, w: WQWeight) -> tuple[bool, str]:
    """Whether ``decode_matmul`` takes (x, w), and why not."""
    if not 1 <= x.shape[0] <= 16:
        return False, f"M={x.shape[0]} (the decode configs take 1..16 rows)"
    ok, why = can_run(x, w)
    if ok and not any(c.block_m >= x.shape[0] and c.split <= k_steps(w)
                      for c in DECODE_CONFIGS):
        return False, f"K={w.k}: no decode config takes it"
    return ok, why
