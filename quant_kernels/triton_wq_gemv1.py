"""Single-row decode kernel (M == 1) for 4-bit ``WQWeight``: packed-half dot products.

At M == 1 a GEMV moves half a byte per weight, so on an H100 (~3 TB/s) the weight stream
leaves ~2.5 SM instructions per weight for unpacking and multiplying before the kernel
stops being bandwidth-bound.  The generic decode kernel (``triton_wq_gemv``) spends more:
it builds fp32 values one nibble at a time and interleaves the eight slices back into K
order.  Here one PTX block per packed word does everything in f16x2/bf16x2 pairs:

* ``w4 = w >> 4`` once; for pair ``i`` a ``prmt`` puts byte ``i`` of ``w`` into the low half
  and byte ``i`` of ``w4`` into the high half, so a ``lop3`` leaves values ``2i`` and
  ``2i + 1`` (K order) under the exponent of 1024 (fp16) or 128 (bf16): the "magic
  number" conversion, exact (see ``wq_layout``'s PTX notes);
* a packed subtract makes them exactly ``q``; a packed FMA makes ``q * s + b`` (rounded
  once to the activation dtype, as the tensor-core path's dequant);
* the pair multiplies the activation pair ``(x[8j + 2i], x[8j + 2i + 1])``, which is
  simply the int32 at ``8j + 2i`` of the fp16/bf16 activation row: no shuffling of x;
* four such pairs accumulate in one f16x2/bf16x2 register (4 products per lane), which is
  then widened to fp32 and summed.  Everything after that is fp32.

About 25 instructions per word (8 weights), against ~40 for the fp32 unpack.  Accuracy:
the products and 4-term partial sums are rounded to the activation dtype (relative
error ~2^-11 for fp16, 2^-8 for bf16, like the dtype's own output rounding); the partial
sums of one word cannot overflow fp16 unless ``|w * x|`` exceeds 16k.

``TRITON_INTERPRET=1`` cannot run PTX: there ``_word_dot`` is replaced by the same math in
fp32 tl ops (indexing, masks and split-K are what the CPU tests check; the PTX itself is
checked by the GPU tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_wq_tile import (INTERPRET, autotune_kwargs, device_fn, launch_tuned,
                             split_range, store_tile, splitk_workspace, split_locks)
from .wq_layout import WQWeight, check_pinned_k_tile, k_tile_ok, next_pow2, num_sms


def _ptx_word_dot(bf16: bool) -> str:
    """$0 (f32) = sum over the 8 values of word $1 of (q*s + b) * x; $2..$5 the activation
    pairs, $6/$7 the (scale, bias) pair of the row (same value in both halves)."""
    t = "bf16x2" if bf16 else "f16x2"
    magic = "0x43004300" if bf16 else "0x64006400"
    body = ["{", ".reg .b32 w4, t, q, v, acc, mg, tlo, thi;", ".reg .b16 lo, hi;",
            ".reg .f32 flo, fhi;",
            f"mov.b32 mg, {magic};", "shr.u32 w4, $1, 4;"]
    for i in range(4):
        sel = hex(i | i << 4 | (4 + i) << 8 | (4 + i) << 12)
        mul = (f"mul.rn.{t} acc, v, $2;" if i == 0 else f"fma.rn.{t} acc, v, ${2 + i}, acc;")
        body.append(f"prmt.b32 t, $1, w4, {sel}; lop3.b32 t, t, 0x000F000F, mg, 0xEA; "
                    f"sub.{t} q, t, mg; fma.rn.{t} v, q, $6, $7; {mul}")
    if bf16:  # bf16 -> f32 is a 16-bit shift: no cvt needed
        body.append("shl.b32 tlo, acc, 16; and.b32 thi, acc, 0xFFFF0000; "
                    "mov.b32 flo, tlo; mov.b32 fhi, thi;")
    else:
        body.append("mov.b32 {lo, hi}, acc; cvt.f32.f16 flo, lo; cvt.f32.f16 fhi, hi;")
    body.append("add.f32 $0, flo, fhi;")
    return "\n".join(body + ["}"])


EMULATE = tl.constexpr(INTERPRET)
ASM_DOT_F16 = tl.constexpr(_ptx_word_dot(False))
ASM_DOT_BF16 = tl.constexpr(_ptx_word_dot(True))


@device_fn
def _pair(v16):
    """fp16/bf16 [R] -> int32 [R] holding the value in both halves (for f16x2 operands)."""
    u = v16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return u | (u << 16)


@device_fn
def _half(pairs, hi: tl.constexpr, DTYPE: tl.constexpr):
    """One half of int32 activation pairs as fp32 (interpreter path)."""
    u = (pairs >> 16) & 0xFFFF if hi else pairs & 0xFFFF
    return u.to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)


@device_fn
def _word_dot_emulated(words, x0, x1, x2, x3, s, b, DTYPE: tl.constexpr):
    """What the PTX computes, in fp32 (no intermediate rounding): the interpreter's path."""
    sf = s.to(tl.float32)
    bf = b.to(tl.float32)
    acc = tl.zeros(words.shape, dtype=tl.float32)
    for i in tl.static_range(4):
        xi = x0 if i == 0 else (x1 if i == 1 else (x2 if i == 2 else x3))
        qlo = ((words >> (8 * i)) & 0xF).to(tl.float32)
        qhi = ((words >> (8 * i + 4)) & 0xF).to(tl.float32)
        acc += (qlo * sf + bf) * _half(xi, False, DTYPE) + (qhi * sf + bf) * _half(xi, True, DTYPE)
    return acc


@device_fn
def _load_tile3(qw_ptr, s_ptr, b_ptr, offs_n, n_lim, k0, KW, GROUP, N_GROUPS,
                stride_qn, stride_qk, stride_sn, stride_sg, stride_bn, stride_bg,
                BLOCK_K: tl.constexpr, NSUB: tl.constexpr):
    """Words [BLOCK_N, NSUB, BLOCK_K / 8] of the K tile at k0 (NSUB sub-tiles of BLOCK_K
    columns, each inside one group) and their scale/bias [BLOCK_N, NSUB]; rows >= n_lim
    read nothing.  NSUB > 1 makes each row's run of bytes per tile longer (64 bytes per
    sub-tile at BLOCK_K = 128), which the DRAM serves better than many short runs."""
    SUBW: tl.constexpr = BLOCK_K // 8
    n_mask = offs_n < n_lim
    sub = tl.arange(0, NSUB)
    offs_w = k0 // 8 + sub[:, None] * SUBW + tl.arange(0, SUBW)[None, :]       # [NSUB, SUBW]
    words = tl.load(qw_ptr + offs_n[:, None, None] * stride_qn + offs_w[None, :, :] * stride_qk,
                    mask=n_mask[:, None, None] & (offs_w < KW)[None, :, :], other=0)
    g = (k0 + sub * BLOCK_K) // GROUP                                          # [NSUB]
    gmask = n_mask[:, None] & (g < N_GROUPS)[None, :]
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=gmask,
                other=0.0)
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + g[None, :] * stride_bg, mask=gmask,
                other=0.0)
    return words, s, b


@device_fn
def _tile_dot(acc, words, s, b, xw_ptr, k0, n_pairs, DTYPE: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NSUB: tl.constexpr):
    """acc[BLOCK_N, NSUB, BLOCK_K / 8] += per-word dot products of one K tile."""
    SUBW: tl.constexpr = BLOCK_K // 8
    # first activation pair of each word, [NSUB, SUBW]
    pw = k0 // 2 + tl.arange(0, NSUB)[:, None] * (BLOCK_K // 2) + 4 * tl.arange(0, SUBW)[None, :]
    x0 = tl.load(xw_ptr + pw, mask=pw < n_pairs, other=0)[None, :, :]
    x1 = tl.load(xw_ptr + pw + 1, mask=pw + 1 < n_pairs, other=0)[None, :, :]
    x2 = tl.load(xw_ptr + pw + 2, mask=pw + 2 < n_pairs, other=0)[None, :, :]
    x3 = tl.load(xw_ptr + pw + 3, mask=pw + 3 < n_pairs, other=0)[None, :, :]
    if EMULATE:
        acc += _word_dot_emulated(words, x0, x1, x2, x3, s.to(DTYPE)[:, :, None],
                                  b.to(DTYPE)[:, :, None], DTYPE)
    else:
        shape: tl.constexpr = (BLOCK_N, NSUB, SUBW)
        args = [words, tl.broadcast_to(x0, shape), tl.broadcast_to(x1, shape),
                tl.broadcast_to(x2, shape), tl.broadcast_to(x3, shape),
                tl.broadcast_to(_pair(s.to(DTYPE))[:, :, None], shape),
                tl.broadcast_to(_pair(b.to(DTYPE))[:, :, None], shape)]
        if DTYPE == tl.bfloat16:
            acc += tl.inline_asm_elementwise(ASM_DOT_BF16, "=f,r,r,r,r,r,r,r", args,
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            acc += tl.inline_asm_elementwise(ASM_DOT_F16, "=f,r,r,r,r,r,r,r", args,
                                             dtype=tl.float32, is_pure=True, pack=1)
    return acc


@triton.jit(do_not_specialize=["N"])
def _wq_gemv1_kernel(
    # activations [1, K] (K-contiguous, 4-byte aligned), packed 4-bit weight [N, KW],
    # scales/bias [N, Gn], output [1, N], split-K partials [SPLIT_K, N] and tile counters
    x_ptr, qw_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
    N, K, KW, GROUP, N_GROUPS,
    stride_qn, stride_qk, stride_sn, stride_sg, stride_bn, stride_bg, stride_on,
    # a K tile is NSUB sub-tiles of BLOCK_K columns (BLOCK_K divides the group)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NSUB: tl.constexpr,
    SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    TILE_K: tl.constexpr = BLOCK_K * NSUB
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    kt_lo, kt_hi = split_range(pid_k, K, TILE_K, SPLIT_K)
    # activation pairs: int32 j of the row holds x[2j] (low half) and x[2j + 1]
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    n_pairs = K // 2  # K is even (the wrapper checks)
    acc = tl.zeros([BLOCK_N, NSUB, BLOCK_K // 8], dtype=tl.float32)
    if PREFETCH == 0:  # plain loop: the pipeliner (num_stages) may stage the loads
        for kt in range(kt_lo, kt_hi):
            words, s, b = _load_tile3(qw_ptr, s_ptr, b_ptr, offs_n, N, kt * TILE_K, KW, GROUP,
                                      N_GROUPS, stride_qn, stride_qk, stride_sn, stride_sg,
                                      stride_bn, stride_bg, BLOCK_K, NSUB)
            acc = _tile_dot(acc, words, s, b, xw_ptr, kt * TILE_K, n_pairs, DTYPE,
                            BLOCK_N, BLOCK_K, NSUB)
    else:
        # software prefetch of the next tile; past the split's end the row limit is 0, so
        # the load touches no memory
        words, s, b = _load_tile3(qw_ptr, s_ptr, b_ptr, offs_n, tl.where(kt_lo < kt_hi, N, 0),
                                  kt_lo * TILE_K, KW, GROUP, N_GROUPS, stride_qn, stride_qk,
                                  stride_sn, stride_sg, stride_bn, stride_bg, BLOCK_K, NSUB)
        for kt in range(kt_lo, kt_hi):
            nw, ns, nb = _load_tile3(qw_ptr, s_ptr, b_ptr, offs_n,
                                     tl.where(kt + 1 < kt_hi, N, 0), (kt + 1) * TILE_K, KW,
                                     GROUP, N_GROUPS, stride_qn, stride_qk, stride_sn,
                                     stride_sg, stride_bn, stride_bg, BLOCK_K, NSUB)
            acc = _tile_dot(acc, words, s, b, xw_ptr, kt * TILE_K, n_pairs, DTYPE,
                            BLOCK_N, BLOCK_K, NSUB)
            words, s, b = nw, ns, nb
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    store_tile(total, ws_ptr, lock_ptr, out_ptr + offs_n * stride_on, offs_n, n_mask, N, pid_n,
               SPLIT_K)


# ----------------------------------------------------------------------------- tuning
def _cfg1(bn, bk, nsub, sk, warps=4, prefetch=0, stages=3):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "NSUB": nsub, "SPLIT_K": sk,
                          "PREFETCH": prefetch}, num_warps=warps, num_stages=stages)


# From scripts/sweep_gemv.py on the H100 (BENCHMARKS.md): ~4 programs per SM, so split K
# 4-16 ways unless N alone gives that many tiles; the loads staged by the pipeliner
# (num_stages 3-4) or prefetched by hand (PREFETCH=1) do equally well.
GEMV1_CONFIGS = [
    _cfg1(128, 128, 1, 8), _cfg1(128, 128, 1, 16), _cfg1(128, 128, 1, 4),
    _cfg1(64, 128, 2, 4), _cfg1(64, 128, 2, 8), _cfg1(128, 128, 2, 8, stages=4),
    _cfg1(256, 128, 1, 8, warps=8), _cfg1(128, 128, 2, 4, prefetch=1, stages=1),
    _cfg1(128, 128, 4, 4),
    # N alone fills the GPU (lm_head-sized N)
    _cfg1(128, 128, 1, 1), _cfg1(64, 128, 2, 1), _cfg1(64, 128, 1, 1),
    # groups of 32 / 64 (GGUF): narrower sub-tiles, several per K tile
    _cfg1(128, 32, 4, 8), _cfg1(128, 32, 8, 4), _cfg1(64, 32, 4, 8), _cfg1(128, 64, 2, 8),
    _cfg1(128, 64, 4, 4), _cfg1(64, 64, 2, 8), _cfg1(128, 32, 4, 1), _cfg1(128, 64, 2, 1),
]
SAFE_GEMV1_CONFIG = _cfg1(32, 32, 1, 1)


def _prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    n, k, group = a["N"], a["K"], a["GROUP"]
    n_groups = -(-k // group)
    kp = n_groups * group
    sms = num_sms(a["x_ptr"].device)
    kept = []
    for c in configs:
        bn, bk, nsub, sk = (c.kwargs[key] for key in ("BLOCK_N", "BLOCK_K", "NSUB", "SPLIT_K"))
        if not k_tile_ok(bk, group, n_groups, kp) or bk * nsub > max(32, next_pow2(kp)):
            continue
        if bk < 128 and group % 128 == 0:  # narrower sub-tiles only for small groups
            continue
        tiles = triton.cdiv(k, bk * nsub)
        if sk > 1 and (triton.cdiv(n, bn) >= 2 * sms or sk > tiles):
            continue
        kept.append(c)
    return kept or [SAFE_GEMV1_CONFIG]


_tuned = triton.autotune(configs=GEMV1_CONFIGS, key=["N", "K", "GROUP", "N_GROUPS"],
                         prune_configs_by={"early_config_prune": _prune},
                         **autotune_kwargs())(_wq_gemv1_kernel)


def can_run(x: torch.Tensor, w: WQWeight) -> tuple[bool, str]:
    """Whether this kernel takes (x, w): one row, 4-bit, even K, a K-contiguous 4-byte
    aligned row (activation pairs are read as int32)."""
    if x.shape[0] != 1:
        return False, f"M={x.shape[0]} (this kernel takes one row)"
    if w.bits != 4:
        return False, f"{w.bits}-bit weight (4-bit only)"
    if w.k % 2 or x.stride(-1) != 1 or x.data_ptr() % 4:
        return False, "odd K or an activation row not 4-byte aligned"
    if os.environ.get("QUANTRT_WQ_GEMV1", "1") == "0":
        return False, "disabled by QUANTRT_WQ_GEMV1=0"
    return True, ""


def _grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


def gemv1(x: torch.Tensor, w: WQWeight, out: torch.Tensor,
          config: triton.Config | None = None) -> torch.Tensor:
    """``out[1, N] = x[1, K] @ W.T`` (x already permuted; ``can_run`` holds)."""
    ok, why = can_run(x, w)
    if not ok:
        raise ValueError(f"gemv1 cannot take this input: {why}")
    if config is None and INTERPRET:
        bk = next(bk for bk in (128, 64, 32) if k_tile_ok(bk, w.group_size, w.n_groups, w.kp))
        nsub = 2 if triton.cdiv(w.k, bk) >= 4 else 1
        config = _cfg1(min(64, max(16, triton.next_power_of_2(w.n))), bk, nsub,
                       2 if triton.cdiv(w.k, bk * nsub) >= 2 else 1)
    if config is not None:
        check_pinned_k_tile(config.kwargs, w)
    configs = [config] if config is not None else GEMV1_CONFIGS
    ws = splitk_workspace(x.device, 1, w.n, configs, config)
    args = (x, w.qweight, w.scales, w.bias, out, ws, split_locks(x.device),
            w.n, w.k, w.qweight.shape[1], w.group_size, w.n_groups,
            w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0), w.scales.stride(1),
            w.bias.stride(0), w.bias.stride(1), out.stride(1))
    if config is not None:
        _wq_gemv1_kernel[_grid(w.n)(config.kwargs)](*args, **config.all_kwargs())
        return out
    launch_tuned(w.plans, ("gemv1", x.dtype), _wq_gemv1_kernel, _tuned, _grid(w.n), args, {})
    return out
