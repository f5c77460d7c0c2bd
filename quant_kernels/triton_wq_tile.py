"""Device helpers shared by the WQ kernels (decode, swap, fused GEMM, dequantize) and their
launch plumbing (split-K counters and workspaces, autotuner options, tuned-config cache).

Loading a tile: a ``[BLOCK_N, BLOCK_K / P]`` block of packed words (rows are K-contiguous:
16-byte vector loads, whole sectors) plus its scales and biases: one per row when
``BLOCK_K`` divides the group (group-major scales make that one coalesced load), or one
per word when the tile spans several small groups (``WIDE``).

Dequantizing a tile: value ``p`` of every word is extracted as a slice ``[BLOCK_N,
BLOCK_K / P]`` and the P slices are interleaved back into natural K order (join/reshape),
so activations are read with plain contiguous loads.  Two ways:

* ``dequant_tile_fast`` (GPU, fp16; bf16 4-bit): PTX from ``wq_layout`` turns pairs of
  words into f16x2/bf16x2 ``q * s + b`` with ~2 instructions per weight.
* ``dequant_tile`` (everywhere): ``1 + q / 2**bits`` as an exact fp32 from one constant
  shift and one and/or with 1.0's exponent bits (no int->float instruction), then one
  FMA ``f * s 2**b + (b - s 2**b)`` and a cast.

Split-K: each split writes fp32 partials to ``ws[s, M, N]``; the last split of a tile to
arrive sums them in split order (``store_tile``: deterministic, one launch).
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from .wq_layout import PTX_BF16_U4, PTX_F16_U4, PTX_F16_U8, WQWeight, m_bucket

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# split-K partials cost SPLIT_K * M * N * 4 bytes; past this N the grid is large anyway
SPLITK_MAX_N = 32768


# ----------------------------------------------------------------------------- unpacking
# The interpreter re-patches triton.language on every call of a @triton.jit device
# function (~0.5 ms each, ~10 per K tile here); as plain Python functions the helpers run
# the same tl ops without that, which keeps the interpreted tests fast.
device_fn = (lambda fn: fn) if INTERPRET else triton.jit


if INTERPRET:
    def mma(a, b, acc):
        # Triton 3.9's interpreter computes bf16 tl.dot wrongly; bf16 products are
        # exact in fp32, so an fp32 dot gives what the GPU's bf16 MMA gives.
        if a.dtype == tl.bfloat16:
            a, b = a.to(tl.float32), b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision="ieee")
else:
    @triton.jit
    def mma(a, b, acc):
        return tl.dot(a, b, acc)


@device_fn
def _unit_slice(words, P: tl.constexpr, BITS: tl.constexpr):
    # Move value P's bits to the top of the fp32 mantissa and OR in 1.0's exponent:
    # exactly 1 + q / 2**BITS, with a constant shift and no int->float conversion
    # (the arithmetic right shift's sign bits never survive the mask).
    SH: tl.constexpr = 23 - BITS - P * BITS
    if SH >= 0:
        v = words << SH
    else:
        v = words >> (-SH)
    v = (v & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000
    return v.to(tl.float32, bitcast=True)


@device_fn
def _interleave(a, b):
    # tl.interleave for 2-D tensors, built from the join/reshape builtins directly
    # (tl.interleave is itself a @jit function: slow under the interpreter)
    c = tl.join(a, b)
    return tl.reshape(c, [c.shape[0], 2 * c.shape[1]])


@device_fn
def _natural_order(s0, s1, s2, s3, s4, s5, s6, s7, BITS: tl.constexpr):
    """Slices [R, C] (s_p = value p of every word) -> [R, C * P] in natural K order."""
    # interleave(a, b) puts a at even and b at odd positions; log2(P) levels put leaf i
    # at position bitreverse(i), so the leaves go in bit-reversed order.
    if BITS == 4:
        lo = _interleave(_interleave(s0, s4), _interleave(s2, s6))
        hi = _interleave(_interleave(s1, s5), _interleave(s3, s7))
        return _interleave(lo, hi)
    else:
        return _interleave(_interleave(s0, s2), _interleave(s1, s3))


@device_fn
def unpack_unit(words, BITS: tl.constexpr):
    """[R, C] int32 words -> [R, C * 32 // BITS] fp32 ``1 + q / 2**BITS``, natural K order."""
    if BITS == 4:
        return _natural_order(
            _unit_slice(words, 0, 4), _unit_slice(words, 1, 4), _unit_slice(words, 2, 4),
            _unit_slice(words, 3, 4), _unit_slice(words, 4, 4), _unit_slice(words, 5, 4),
            _unit_slice(words, 6, 4), _unit_slice(words, 7, 4), 4)
    else:
        return _natural_order(
            _unit_slice(words, 0, 8), _unit_slice(words, 1, 8), _unit_slice(words, 2, 8),
            _unit_slice(words, 3, 8), None, None, None, None, 8)


@device_fn
def load_tile(qw_ptr, s_ptr, b_ptr, offs_n, n_lim, k0, KW, GROUP,
              stride_qn, stride_qk, stride_sn, stride_sg, stride_bn, stride_bg,
              BITS: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr = False):
    """Packed words [BLOCK_N, BLOCK_K / P] of the K tile at k0 and their scales/biases:
    one per row ([BLOCK_N]) when the tile sits in one group, or (WIDE, a tile spanning
    several small groups, e.g. GGUF's 32) one per word ([BLOCK_N, BLOCK_K / P], gathered:
    the words of a group share an address, so the loads mostly hit L1).  Rows >= n_lim
    read nothing."""
    BLOCK_KW: tl.constexpr = BLOCK_K * BITS // 32
    n_mask = offs_n < n_lim
    offs_w = k0 // (32 // BITS) + tl.arange(0, BLOCK_KW)
    wmask = n_mask[:, None] & (offs_w < KW)[None, :]
    words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :] * stride_qk,
                    mask=wmask, other=0)
    if WIDE:
        g = (offs_w * (32 // BITS)) // GROUP
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=wmask,
                    other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + g[None, :] * stride_bg, mask=wmask,
                    other=0.0)
    else:
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0)
        b = tl.load(b_ptr + offs_n * stride_bn + g * stride_bg, mask=n_mask, other=0.0)
    return words, s, b


@device_fn
def dequant_tile(words, s, b, BITS: tl.constexpr, DTYPE: tl.constexpr,
                 WIDE: tl.constexpr = False):
    """[BLOCK_N, BLOCK_K] weights ``q * s + b`` in DTYPE (fp32 math, one FMA per weight)."""
    S = s.to(tl.float32) * (1 << BITS)
    B = b.to(tl.float32) - S
    if WIDE:  # per-word scales: scale each value slice, then put K in order
        if BITS == 4:
            w = _natural_order(
                (_unit_slice(words, 0, 4) * S + B).to(DTYPE),
                (_unit_slice(words, 1, 4) * S + B).to(DTYPE),
                (_unit_slice(words, 2, 4) * S + B).to(DTYPE),
                (_unit_slice(words, 3, 4) * S + B).to(DTYPE),
                (_unit_slice(words, 4, 4) * S + B).to(DTYPE),
                (_unit_slice(words, 5, 4) * S + B).to(DTYPE),
                (_unit_slice(words, 6, 4) * S + B).to(DTYPE),
                (_unit_slice(words, 7, 4) * S + B).to(DTYPE), 4)
        else:
            w = _natural_order(
                (_unit_slice(words, 0, 8) * S + B).to(DTYPE),
                (_unit_slice(words, 1, 8) * S + B).to(DTYPE),
                (_unit_slice(words, 2, 8) * S + B).to(DTYPE),
                (_unit_slice(words, 3, 8) * S + B).to(DTYPE), None, None, None, None, 8)
    else:
        w = (unpack_unit(words, BITS) * S[:, None] + B[:, None]).to(DTYPE)
    return w


# the PTX recipes, and why they are exact, are in wq_layout
ASM_F16_U4 = tl.constexpr(PTX_F16_U4)
ASM_BF16_U4 = tl.constexpr(PTX_BF16_U4)
ASM_F16_U8 = tl.constexpr(PTX_F16_U8)


def fast_dequant_ok(act_dtype: torch.dtype, bits: int) -> bool:
    """Whether the PTX dequant applies (GPU, not disabled, fp16 or 4-bit bf16)."""
    return (not INTERPRET and os.environ.get("QUANTRT_WQ_FAST_DEQUANT", "1") != "0"
            and (act_dtype == torch.float16 or bits == 4))


@device_fn
def dequant_tile_fast(words, s, b, BITS: tl.constexpr, DTYPE: tl.constexpr,
                      WIDE: tl.constexpr = False):
    """Same result as dequant_tile (rounded once to DTYPE), via the PTX above (pack=2 pairs
    two words of a row, and with WIDE their two scales)."""
    if WIDE:
        s = s.to(DTYPE)
        b = b.to(DTYPE)
    else:
        s = s.to(DTYPE)[:, None]
        b = b.to(DTYPE)[:, None]
    if BITS == 4:
        if DTYPE == tl.float16:
            q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
                ASM_F16_U4, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, s, b],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                       tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
        else:
            q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
                ASM_BF16_U4, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, s, b],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                       tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        return _natural_order(q0, q1, q2, q3, q4, q5, q6, q7, 4)
    else:
        q0, q1, q2, q3 = tl.inline_asm_elementwise(
            ASM_F16_U8, "=r,=r,=r,=r,r,r,r,r", [words, s, b],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
        return _natural_order(q0, q1, q2, q3, None, None, None, None, 8)


@device_fn
def split_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[kt_lo, kt_hi): the K tiles of split ``pid_k`` (the last splits may get none and
    then contribute zeros)."""
    num_kt = tl.cdiv(K, BLOCK_K)
    kt_per_split = tl.cdiv(num_kt, SPLIT_K)
    kt_lo = pid_k * kt_per_split
    return kt_lo, tl.minimum(kt_lo + kt_per_split, num_kt)


@device_fn
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``pid``: GROUP_M consecutive programs walk down a
    column of M tiles before the next N tile, so each weight tile read from DRAM is reused
    from L2 by the others."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return (first_pid_m + ((pid % num_pid_in_group) % group_size_m),
            (pid % num_pid_in_group) // group_size_m)


@device_fn
def store_tile(acc, ws_ptr, lock_ptr, out_ptrs, ws_offs, mask, MN, tile,
               SPLIT_K: tl.constexpr):
    """Every kernel's epilogue: without split-K, cast and store the tile.  With it, in the
    same launch: write this split's fp32 partial to ``ws[split]`` at ``ws_offs``, count the
    tile's arrivals, and the last split to arrive sums all partials in split order
    (deterministic), writes the output and re-arms the counter (no second kernel, no
    zero-fill)."""
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + tl.program_id(1) * MN + ws_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is issued before the release below
        count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if count == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for sk in tl.static_range(SPLIT_K):
                # .cg: read the other programs' partials from L2, never a stale L1 line
                total += tl.load(ws_ptr + sk * MN + ws_offs, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


# ----------------------------------------------------------------------------- tuning
MAX_SPLIT_TILES = 1 << 16  # split-K tile counters per device (grid N tiles x M tiles)
_locks: dict = {}


def check_split_tiles(tiles: int, split: int) -> None:
    """A split-K launch needs one counter per output tile (``split_locks``)."""
    if split > 1 and tiles > MAX_SPLIT_TILES:
        raise ValueError(f"split-K over {tiles} output tiles: more than the "
                         f"{MAX_SPLIT_TILES} counters (use SPLIT_K=1)")


def split_locks(device) -> torch.Tensor:
    """Zeroed int32 counters, one per output tile of a split-K launch, shared by every
    launch on ``device``: each launch leaves them at zero again.  Launches on one stream
    run one after another, which is how the runtime uses them (two split-K launches on
    concurrent streams would need their own counters)."""
    key = torch.device(device)
    t = _locks.get(key)
    if t is None:
        t = _locks[key] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=key)
    return t


def splitk_workspace(device, m: int, n: int, configs, config=None) -> torch.Tensor:
    """fp32 partials for the largest split the launch may pick (1 element if none)."""
    if config is not None:
        split = config.kwargs["SPLIT_K"]
    else:
        split = max(c.kwargs["SPLIT_K"] for c in configs) if n <= SPLITK_MAX_N else 1
    return torch.empty(split * m * n if split > 1 else 1, device=device, dtype=torch.float32)


def autotune_kwargs(graph: bool = False) -> dict:
    """Options every WQ autotuner shares: short benchmarks (the key space is large) and
    results kept in Triton's on-disk cache where this Triton supports it.  ``graph``:
    time configs with ``graph_time`` instead of ``do_bench`` (decode kernels of 10-40 us,
    where do_bench's isolated calls after a memset of dirty lines picked configs up to 7%
    slower than the best under graph replay: BENCHMARKS.md, session 8)."""
    opts = {}
    params = inspect.signature(triton.autotune).parameters
    if "cache_results" in params:
        opts["cache_results"] = True
    if "do_bench" in params:
        def bench(fn, quantiles):
            if graph:
                t = graph_time(fn)
                return [t] * len(quantiles) if quantiles else t
            return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)
        opts["do_bench"] = bench
    return opts


def graph_time(fn, reps: int = 10, tries: int = 3) -> float:
    """GPU milliseconds per call of ``fn`` as the engine runs it: replayed from a CUDA
    graph (no host launch cost, which ``do_bench`` counts for a 10 us kernel), each call
    after a 64 MiB read that evicts L2 (so weights come from DRAM, as in a model whose
    layers do not fit L2; a read leaves clean lines, as the previous layers' weights do,
    where a memset leaves dirty ones whose write-backs share DRAM with the kernel); the
    read's own time is measured alone and subtracted.  Best of ``tries`` replays."""
    fn()  # compiles / autotunes outside the capture
    flush = torch.empty(16 << 20, dtype=torch.float32, device="cuda")
    flush.fill_(1.0)
    sink = torch.empty((), dtype=torch.float32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graphs = []
    with torch.cuda.stream(side):
        for body in (lambda: (torch.sum(flush, dim=0, out=sink), fn()),
                     lambda: torch.sum(flush, dim=0, out=sink)):
            body()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=side):
                for _ in range(reps):
                    body()
            graphs.append(g)
    torch.cuda.current_stream().wait_stream(side)
    times = []
    for g in graphs:
        best = float("inf")
        for _ in range(tries):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        times.append(best)
    return max(times[0] - times[1], 0.0) / reps


# (candidates, M bucket, N, K, group, bits, dtype) -> the fastest candidate's name: a tuning
# cache like Triton's own autotuner's (per shape, not per weight, so torch.compile's custom
# op, which rebuilds the WQWeight on each call, finds it too), filled on the first call of
# each key outside CUDA-graph capture (the engine runs every batch size eagerly first)
CHOICES: dict = {}
CHOICE_ROUNDS = 3


def timed_choice(x: torch.Tensor, w: WQWeight, out: torch.Tensor, fns: dict, cap: int,
                 fallback: str) -> str:
    """The fastest of ``fns`` (name -> kernel(x, w, out)) for this shape, M bucketed up to
    ``cap``: each autotuned by its first call, then timed.  ``fallback`` where timing is
    impossible (interpreter, CPU, during a capture)."""
    key = (tuple(fns), m_bucket(x.shape[0], cap), w.n, w.k, w.group_size, w.bits, x.dtype)
    choice = CHOICES.get(key)
    if choice is not None:
        return choice
    if INTERPRET or not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return fallback
    # rounds alternate the candidates and keep each one's best: one graph_time has ~6%
    # noise at 20 us (the flush read it subtracts), enough to pick gemv1 (21.4 us) over
    # the MMA kernel (19.0 us) at 8192x8192 M=1 (BENCHMARKS.md, session 9)
    times = dict.fromkeys(fns, float("inf"))
    with torch.cuda.device(x.device):
        for _ in range(CHOICE_ROUNDS):
            for name, fn in fns.items():
                times[name] = min(times[name], graph_time(lambda fn=fn: fn(x, w, out)))
    choice = CHOICES[key] = min(times, key=times.get)
    return choice


def launch_tuned(plans: dict, key: tuple, kernel, tuned, grid, args: tuple, consts: dict
                 ) -> triton.Config:
    """Launch through the autotuner the first time ``key`` is seen, then ``kernel`` directly
    with the config it picked (the autotuner's key building and dispatch cost tens of
    microseconds per call, as much as a decode GEMV itself)."""
    cfg = plans.get(key)
    if cfg is None:
        tuned[grid](*args, **consts)
        cfg = plans[key] = tuned.best_config
    else:
        kernel[grid(cfg.kwargs)](*args, **consts, **cfg.all_kwargs())
    return cfg
