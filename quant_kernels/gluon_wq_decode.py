"""Decode (M <= 16) on Hopper: ``gluon_wq_rs``'s register-operand GEMM with small tiles.

``triton_wq_mma`` keeps every byte it has in flight in registers, and 88-90 of them per
thread cap it at 16 warps per SM: it reaches ~76% of what a plain read of the weight
achieves (BENCHMARKS.md, session 8).  Here the loader warp's TMA copies fill a ring in
shared memory, so the bytes in flight cost no registers, and the MMA warpgroup
dequantizes each slot straight into wgmma's A fragment, with the activations as a
16-column B operand (rows past M are TMA's zero fill).  It serves M = 9..16 (``MIN_M``).  With one
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

# M = 9..16 (wgmma N = 16): 64-128 weight rows per CTA and K split 2-8 ways, so that every
# SM runs 2-4 CTAs (8192x8192 has only 128 tiles of 64 rows for 132 SMs).  The winners of a
# sweep of 16 configs on the H100 (BENCHMARKS.md, session 11), each the best at M = 16 on
# one of the four benchmark shapes or close to it.  Deeper rings did not help (6 slots
# against 10-12); more CTAs per SM did (at 8192x8192 M = 16: 1 CTA 1.34x, 2-4 CTAs 2.1x).
DECODE_CONFIGS = tuple(RSConfig(*c) for c in (
    (16, 64, 4, 8, 3, 3), (16, 128, 4, 6, 2, 4), (16, 64, 4, 6, 4, 4), (16, 128, 4, 6, 2, 2),
    (16, 64, 4, 6, 4, 8), (16, 128, 4, 6, 2, 8)))
# From M = 9 on: at M <= 8 triton_wq_mma (one 8-column MMA block) was faster on every shape
# measured (M = 1: 2.55x against 2.41x at best; M = 4: 2.40x against 2.05x, 8192x8192), and
# a timed choice between two kernels 5% apart picks the slower one now and then
MIN_M = 9


def _takes(cfg: RSConfig, w: WQWeight) -> bool:
    # no more K splits than K has steps (every split needs one), and the ring fits an SM
    return cfg.split <= k_steps(w) and fits(cfg)


def decode_candidates(x: torch.Tensor, w: WQWeight) -> dict:
    """Label -> launch of every decode config that takes (x, w)."""
    return {c.label: functools.partial(launch, cfg=c) for c in DECODE_CONFIGS
            if _takes(c, w)}


def decode_matmul(x: torch.Tensor, w: WQWeight, out: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for M = 9..16 with the decode config timed fastest for this shape and M
    bucket (``triton_wq_tile.timed_choice``; inside a CUDA-graph capture an untimed first
    call takes the first candidate, as ``gluon_wq_gemm.ws_matmul`` does)."""
    from .triton_wq_tile import timed_choice
    fns = w.plans.get("rs-decode")
    if fns is None:
        fns = w.plans["rs-decode"] = decode_candidates(x, w)
    if not fns:
        raise ValueError(f"no register-operand decode config takes K={w.k} (call "
                         "can_run_decode first)")
    label = timed_choice(x, w, out, fns, 16, next(iter(fns)))
    return fns[label](x, w, out)


def can_run_decode(x: torch.Tensor, w: WQWeight) -> tuple[bool, str]:
    """Whether ``decode_matmul`` takes (x, w), and why not."""
    if not MIN_M <= x.shape[0] <= 16:
        return False, (f"M={x.shape[0]}: the decode configs take {MIN_M}..16 rows (below, "
                       "triton_wq_mma is faster)")
    ok, why = can_run(x, w)
    if ok and not any(_takes(c, w) for c in DECODE_CONFIGS):
        return False, f"K={w.k}: too few 64-column steps to split"
    return ok, why
