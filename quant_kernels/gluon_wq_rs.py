"""Hopper dequant GEMM with the weight as wgmma's *register* operand (Gluon).

``gluon_wq_gemm`` dequantizes each weight tile into shared memory for wgmma to read back:
per 64-column K step that is a ``BN x 64`` fp16 tile written and read once more than
cuBLAS's operands, and a hand-over between two warp groups.  Here the product is turned
around, ``out.T[N, M] = W[N, K] @ x.T``, so the weight is wgmma's A operand, which may
live in registers: the MMA warpgroups read the packed words from shared memory, turn
them into ``q * s + b`` right in the A fragment's layout and issue the MMA.  The
activation tile is the B operand, straight from the TMA-filled slot.  With async wgmma
and one MMA in flight, a warpgroup dequantizes step ``i + 1`` while the tensor cores run
step ``i``.

* loader (1 warp, ``gluon_wq_gemm._load_part``): TMA copies of ``x[BM, 64]``, the packed
  ``qweight[BN, 64 / 8]`` and the group's scale and bias rows into a ring of ``STAGES``
  slots (``ready`` / ``empty`` mbarriers);
* MMA (``num_warps``: 1-2 warpgroups, 16 weight rows per warp, repeated in registers
  past ``16 * num_warps`` rows): dequant + ``wgmma`` + the transposed, masked store.

Why no shuffle is needed: wgmma's A fragment (k_width 2) gives thread ``t = lane % 4`` the
columns ``8c + 2t`` and ``8c + 2t + 1`` of every 8-column chunk ``c``, for rows
``lane // 4`` and ``+ 8``.  In the common packed layout (``wq_layout``: value ``k`` at
nibble ``k % 8`` of word ``k // 8``) those two values are byte ``t`` of word ``c``.  So
every thread loads its rows' 8 words (the 4 threads of a row read the same words: a
broadcast) and picks byte ``t`` with a ``prmt`` whose selector depends on the lane:
``_ptx_pair`` below.  The value tensor ``[BN, 8 (c), 4 (t), 2]`` has exactly that
layout (``value_layout``), and reshaped to ``[BN, 64]`` it *is* the A fragment.

For decode (``gluon_wq_decode``) a config may split K over ``split`` CTAs per output tile;
the last split to finish sums the fp32 parts in the same launch (``_split_store``).

4-bit only (8-bit words hold a thread's pair in every other word: left to
``gluon_wq_gemm``); fp16 and bf16; groups of 64+ or per channel; sm_90.  Gluon does not
run under ``TRITON_INTERPRET``: the GPU tests check it against ``wq_reference``.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from .gluon_wq_gemm import (BLOCK_K, HAS_GLUON, SMEM_LIMIT, activation_refusal,
                            weight_refusal as _ws_refusal)
from .triton_wq_tile import check_split_tiles, split_locks
from .wq_layout import WQWeight

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, warpgroup_mma, warpgroup_mma_wait)

    from .gluon_wq_gemm import _alloc_ring, _load_part, common_args


@dataclass(frozen=True)
class RSConfig:
    """One launch config: ``BM`` activation rows (wgmma's N) x ``BN`` weight rows per CTA,
    MMA warps, ring depth, CTAs per SM, and ``split``: CTAs sharing one output tile's K
    range (split-K, for decode: 8192x8192 has 128 tiles of 64 rows for 132 SMs)."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    ctas: int = 1      # CTAs per SM the register cap allows (2+: one's epilogue overlaps)
    split: int = 1

    def __post_init__(self):
        if self.block_m not in (8, 16, 32, 64, 128, 256):
            raise ValueError(f"block_m={self.block_m}: 8, 16, 32, 64, 128 or 256 (wgmma N)")
        if self.warps not in (4, 8):
            raise ValueError(f"warps={self.warps}: 4 or 8 (1 or 2 MMA warpgroups)")
        if self.block_n not in (64, 128, 256) or self.block_n < 16 * self.warps:
            raise ValueError(f"block_n={self.block_n} with {self.warps} warps: 64, 128 or "
                             "256 weight rows, at least 16 per warp")
        if self.acc_regs > 128:
            # the accumulator plus two A fragments, the words and addresses must fit the
            # ~240 registers a consumer thread gets next to the loader warp
            raise ValueError(f"{self.block_m}x{self.block_n} on {self.warps} warps needs "
                             f"{self.acc_regs} accumulator registers per thread (<= 128)")
        if not 2 <= self.stages <= 12:
            raise ValueError(f"stages={self.stages}: 2..12 ring slots")
        if not 1 <= self.ctas <= 4 or self.acc_regs * self.ctas > 128:
            raise ValueError(f"ctas={self.ctas}: 1..4 CTAs per SM, with at most "
                             f"{128 // self.ctas} accumulator registers per thread each "
                             f"(this tile needs {self.acc_regs})")
        if self.split not in (1, 2, 3, 4, 6, 8):
            raise ValueError(f"split={self.split}: 1, 2, 3, 4, 6 or 8 CTAs per output tile")

    @property
    def acc_regs(self) -> int:
        return self.block_m * self.block_n // (32 * self.warps)

    @property
    def label(self) -> str:
        return (f"rs{self.block_m}x{self.block_n}w{self.warps}s{self.stages}"
                + (f"k{self.split}" if self.split > 1 else "")
                + (f"c{self.ctas}" if self.ctas > 1 else ""))

    @classmethod
    def from_label(cls, label: str) -> "RSConfig":
        """The config ``label`` names (``rs128x128w8s4``, ``rs16x64w4s8k2c2``)."""
        m = re.fullmatch(r"rs(\d+)x(\d+)w(\d+)s(\d+)(?:k(\d+))?(?:c(\d+))?", label)
        if m is None:
            raise ValueError(f"config label {label!r}: expected rs<BM>x<BN>w<warps>s<stages>"
                             "[k<split>][c<CTAs per SM>], e.g. rs128x128w8s4")
        bm, bn, warps, stages, split, ctas = m.groups()
        return cls(int(bm), int(bn), int(warps), int(stages), int(ctas or 1),
                   int(split or 1))

    def smem_bytes(self, elt: int = 2) -> int:
        per = (self.block_m * BLOCK_K * elt + self.block_n * BLOCK_K // 2
               + 2 * self.block_n * elt)
        return self.stages * per + 4096   # + barriers and the epilogue's regrouping


# Candidates timed on a shape's first call, next to gluon_wq_gemm's (BENCHMARKS.md).
# (128x256 on 8 warps and 64x128 on 8 warps at 2 CTAs per SM were never the best at
# 8192x8192, M = 64..4096: dropped.)  256x128 with 3 slots beat 4 at M = 1024 and 4096
# on 8192x8192 and at 1024 on 4096x14336 (0.80x against 0.72x; session 11): both stay.
CONFIGS = tuple(RSConfig(*c) for c in (
    (64, 64, 4, 4), (64, 128, 8, 4), (128, 64, 4, 4), (128, 128, 8, 4), (256, 64, 4, 4),
    (256, 128, 8, 4), (256, 128, 8, 3), (64, 64, 4, 4, 2), (128, 64, 4, 3, 2)))


def value_layout(block_n: int, warps: int):
    """Linear layout of the dequantized ``[BN, 8 (c), 4 (t), 2 (e)]`` values, value
    ``(n, c, t, e)`` being column ``8c + 2t + e`` of weight row ``n``: registers walk ``e``,
    ``c`` and row ``+ 8``; lanes ``t`` then row ``0..7``; warps 16-row blocks.  Reshaped
    to ``[BN, 64]`` this equals wgmma's A fragment layout (k_width 2) up to the order of a
    thread's registers, so the conversion to it moves no data."""
    reg = [[0, 0, 0, 1], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0], [8, 0, 0, 0]]
    rows = 16 * warps
    while rows < block_n:            # rows past 16 per warp repeat in registers
        reg.append([rows, 0, 0, 0])
        rows *= 2
    lane = [[0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
    warp = [[16 << i, 0, 0, 0] for i in range(warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, 8, 4, 2])


def row_layout(block_n: int, warps: int):
    """The ``[1, BN]`` scale / bias row of a slot, each thread holding its weight rows'
    values (``value_layout`` projected on rows): a shared-memory view cannot drop the
    leading 1 of the TMA box, so the row is loaded 2-D and reshaped."""
    vals = value_layout(block_n, warps)
    proj = lambda bases: [[0, b[0]] for b in bases]   # noqa: E731
    return gl.DistributedLinearLayout(proj(vals.reg_bases), proj(vals.lane_bases),
                                      proj(vals.warp_bases), [], [1, block_n])


# ----------------------------------------------------------------------------- PTX
# Byte ``t`` of a packed word (``$5``: selector 0x4t4t from the lane) -> the pair of
# values (8c + 2t, 8c + 2t + 1) as ``q * s + b`` in one 16-bit pair register.  Operands
# (pack = 2): $0 out; $1, $2 the word; $3 the (s, s) pair; $4 (b, b); $5, $6 the selector.
# Same magic-number steps as gluon_wq_gemm._ptx_nat, with the byte picked at run time.
def _ptx_pair(bf16: bool) -> str:
    if bf16:   # high nibble shifted down first: bf16 cannot absorb the x16 (_ptx_nat)
        return ("{ .reg .b32 t, u, mul, add; mov.b32 mul, 0x3F803F80; "
                "mov.b32 add, 0xC300C300; prmt.b32 t, $1, 0, $5; shr.b32 u, t, 4; "
                "prmt.b32 t, t, u, 0x7610; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; "
                "fma.rn.bf16x2 t, t, mul, add; fma.rn.bf16x2 $0, t, $3, $4; }")
    return ("{ .reg .b32 t, mul, add; mov.b32 mul, 0x2C003C00; mov.b32 add, 0xD400E400; "
            "prmt.b32 t, $1, 0, $5; lop3.b32 t, t, 0x00F0000F, 0x64006400, 0xEA; "
            "fma.rn.f16x2 t, t, mul, add; fma.rn.f16x2 $0, t, $3, $4; }")


_PTX_CONSTRAINTS = "=r,r,r,r,r,r,r"


# ----------------------------------------------------------------------------- kernel
if HAS_GLUON:
    _PTX_F16 = gl.constexpr(_ptx_pair(False))
    _PTX_BF16 = gl.constexpr(_ptx_pair(True))
    _PTX_C = gl.constexpr(_PTX_CONSTRAINTS)
    _PTX_KEEP = gl.constexpr("{ .reg .pred p; setp.lt.s32 p, $6, 0; "
                             "@p st.shared.v4.b32 [$6], {$2, $3, $4, $5}; "
                             "mov.b32 $0, 0; mov.b32 $1, 0; }")
    _PTX_KEEP_C = gl.constexpr(",".join(["=r"] * 2 + ["r"] * 12))

    @gluon.jit
    def _use(frag, M):
        gl.inline_asm_elementwise(_PTX_KEEP, _PTX_KEEP_C, [frag, M], dtype=gl.int8,
                                  is_pure=False, pack=8)

    @gluon.jit
    def _rs_fragment(ring, ready, i, sel, WORDS: gl.constexpr, ROW2: gl.constexpr,
                     ROWS: gl.constexpr, A_FRAG: gl.constexpr):
        """K step ``i``'s weight tile as wgmma's A fragment, once its slot has landed."""
        x_bufs, w_bufs, s_bufs, b_bufs = ring
        STAGES: gl.constexpr = x_bufs.shape[0]
        BN: gl.constexpr = w_bufs.shape[1]
        BK: gl.constexpr = x_bufs.shape[2]
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        words = w_bufs.index(s).load(WORDS)
        sc = gl.convert_layout(gl.reshape(s_bufs.index(s).load(ROW2), [BN]), ROWS)
        bi = gl.convert_layout(gl.reshape(b_bufs.index(s).load(ROW2), [BN]), ROWS)
        w4 = gl.expand_dims(gl.expand_dims(words, 2), 3)
        s4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(sc, 1), 2), 3)
        b4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(bi, 1), 2), 3)
        if x_bufs.dtype == gl.bfloat16:
            v = gl.inline_asm_elementwise(_PTX_BF16, _PTX_C, [w4, s4, b4, sel],
                                          dtype=gl.bfloat16, is_pure=True, pack=2)
        else:
            v = gl.inline_asm_elementwise(_PTX_F16, _PTX_C, [w4, s4, b4, sel],
                                          dtype=gl.float16, is_pure=True, pack=2)
        return gl.convert_layout(gl.reshape(v, [BN, BK]), A_FRAG)

    @gluon.jit
    def _rs_step(acc, a, ring, ready, empty, i, nxt_i, sel, M, WORDS: gl.constexpr,
                 ROW2: gl.constexpr, ROWS: gl.constexpr, A_FRAG: gl.constexpr):
        """Step ``i``'s MMA with fragment ``a``; step ``nxt_i``'s fragment while it runs
        (the last step redoes its own: its slot is still held, and it saves a branch)."""
        x_bufs = ring[0]
        s = i % x_bufs.shape[0]
        acc = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
        nxt = _rs_fragment(ring, ready, nxt_i, sel, WORDS, ROW2, ROWS, A_FRAG)
        # _use (a store that never runs: M >= 0) pins the fragments in time: the next one
        # is computed before the wait (LLVM sank it after, and the dequant no longer
        # overlapped the MMA), and this one's registers stay allocated until the MMA has
        # retired: wgmma reads them while it runs, but the compiler takes them as read at
        # issue and handed them to the next fragment (wrong results on the H100 for the
        # slower configs, BENCHMARKS.md session 10)
        _use(nxt, M)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _use(a, M)
        mbarrier.arrive(empty.index(s), count=1)
        return acc, nxt

    @gluon.jit
    def _rs_mma_part(ring, ready, empty, k_iters, out_ptr, ws_ptr, lock_ptr, tile, split,
                     off_m, off_n, M, N, stride_om, VALS: gl.constexpr, ROW2: gl.constexpr,
                     BM: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
        """MMA warps: per slot, packed words -> A fragment, ``acc += W_tile @ x_tile.T``;
        then ``out[m, n] = acc[n, m]`` (with split-K: once every split has added its
        part, ``_split_store``)."""
        x_bufs, w_bufs, s_bufs, b_bufs = ring
        STAGES: gl.constexpr = x_bufs.shape[0]
        BN: gl.constexpr = w_bufs.shape[1]
        ACC: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 16])
        A_FRAG: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        WORDS: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, VALS))    # [BN, 8]
        ROWS: gl.constexpr = gl.SliceLayout(1, WORDS)                       # [BN]
        TE: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, VALS))       # [4, 2]
        # prmt selector of byte t (both halves of the pair come from it; see _ptx_pair)
        t = gl.arange(0, 4, layout=gl.SliceLayout(1, TE))
        e = gl.arange(0, 2, layout=gl.SliceLayout(0, TE))
        sel = gl.expand_dims(0x4040 | (t << 8) | t, 1) + gl.expand_dims(e * 0, 0)
        sel = gl.expand_dims(gl.expand_dims(sel, 0), 0)                     # [1, 1, 4, 2]

        acc = gl.zeros([BN, BM], gl.float32, ACC)
        a = _rs_fragment(ring, ready, 0, sel, WORDS, ROW2, ROWS, A_FRAG)
        # two steps per iteration, the fragments ping-ponging between a and b: with one
        # step, the loop-carried fragment cost a register copy per value (the next one
        # is live while the MMA still reads this one)
        for j in range(k_iters // 2):
            acc, b = _rs_step(acc, a, ring, ready, empty, 2 * j, 2 * j + 1, sel, M,
                              WORDS, ROW2, ROWS, A_FRAG)
            acc, a = _rs_step(acc, b, ring, ready, empty, 2 * j + 1,
                              gl.minimum(2 * j + 2, k_iters - 1), sel, M, WORDS, ROW2, ROWS,
                              A_FRAG)
        if k_iters % 2 == 1:
            acc, a = _rs_step(acc, a, ring, ready, empty, k_iters - 1, k_iters - 1, sel, M,
                              WORDS, ROW2, ROWS, A_FRAG)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        # out[m, n] = acc[n, m]: regrouped (through shared memory) so that each thread
        # writes 8 consecutive n of one output row, 16 bytes, instead of scattered halves
        TN: gl.constexpr = BN // 8 if BN < 256 else 32
        OUT: gl.constexpr = gl.BlockedLayout([8, 1], [TN, 32 // TN], [1, num_warps], [0, 1])
        rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT))
        cols = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT))
        mask = gl.expand_dims(rows < N, 1) & gl.expand_dims(cols < M, 0)
        ptrs = out_ptr + gl.expand_dims(cols, 0) * stride_om + gl.expand_dims(rows, 1)
        if SPLIT == 1:
            gl.store(ptrs, gl.convert_layout(acc.to(out_ptr.dtype.element_ty), OUT), mask=mask)
        else:
            _split_store(gl.convert_layout(acc, OUT), ptrs, ws_ptr, lock_ptr, tile, split,
                         gl.expand_dims(cols, 0) * N + gl.expand_dims(rows, 1), mask, M * N,
                         SPLIT)

    @gluon.jit
    def _split_store(part, ptrs, ws_ptr, lock_ptr, tile, split, offs, mask, MN,
                     SPLIT: gl.constexpr):
        """Split-K in one launch, as ``triton_wq_tile.store_tile``: this split's fp32 part
        to ``ws[split]``, then the tile's counter; the last split to arrive sums the parts
        in split order (deterministic), stores the tile and re-arms the counter."""
        gl.store(ws_ptr + split * MN + offs, part, mask=mask)
        gl.thread_barrier()   # every thread's part is issued before the release below
        count = gl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if count == SPLIT - 1:
            total = gl.zeros_like(part)
            for sk in gl.static_range(SPLIT):
                # .cg: the other CTAs' parts from L2, never a stale L1 line
                total += gl.load(ws_ptr + sk * MN + offs, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            gl.store(ptrs, total.to(ptrs.dtype.element_ty), mask=mask)
            gl.atomic_xchg(lock_ptr + tile, 0)

    @gluon.jit
    def _wq_rs_kernel(x_desc, w_desc, s_desc, b_desc,            # TMA descriptors
                      out_ptr, ws_ptr, lock_ptr,                   # output, split-K parts
                      M, N, K, group, stride_om,                   # sizes, group, out stride
                      VALS: gl.constexpr, ROW2: gl.constexpr, STAGES: gl.constexpr,
                      SPLIT: gl.constexpr, num_warps: gl.constexpr):
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        # the splits of a tile are neighbours; M tiles next: CTAs running together share
        # a weight tile (read once from DRAM)
        pid = gl.program_id(0)
        tile = pid // SPLIT
        split = pid % SPLIT
        num_m = gl.cdiv(M, BM)
        off_m = (tile % num_m) * BM
        off_n = (tile // num_m) * BN
        # balanced K steps per split, none empty (the host keeps SPLIT <= K / BK)
        k_tiles = gl.cdiv(K, BK)
        k_first = split * k_tiles // SPLIT
        k_iters = (split + 1) * k_tiles // SPLIT - k_first
        ring, ready, empty = _alloc_ring(x_desc, w_desc, s_desc, b_desc, STAGES)
        gl.warp_specialize([
            (_rs_mma_part, (ring, ready, empty, k_iters, out_ptr, ws_ptr, lock_ptr, tile,
                            split, off_m, off_n, M, N, stride_om, VALS, ROW2, BM, SPLIT,
                            num_warps)),
            (_load_part, ((x_desc, w_desc, s_desc, b_desc), ring, ready, empty, off_m,
                          off_n, k_first, k_iters, group)),
        ], [1], [24])


# ----------------------------------------------------------------------------- host
def weight_refusal(w: WQWeight, device) -> str:
    """Why this kernel cannot take weight ``w`` on ``device`` ("" if it can)."""
    if w.bits != 4:
        return (f"{w.bits}-bit weight: 4-bit only (an 8-bit thread's pairs sit in every "
                "other word)")
    return _ws_refusal(w, device)


def can_run(x: torch.Tensor, w: WQWeight) -> tuple[bool, str]:
    """Whether this kernel takes (x, w), and why not."""
    why = activation_refusal(x, w) or weight_refusal(w, x.device)
    return not why, why


def fits(cfg: RSConfig) -> bool:
    # an SM has 228 KiB of shared memory, 227 of them for one CTA, 1 KiB reserved per CTA
    return cfg.smem_bytes() <= min(SMEM_LIMIT, 228 * 1024 // cfg.ctas - 1024)


def _maxnreg(cfg: RSConfig) -> int:
    # all warps are allocated at launch, the loader's padded to a warpgroup; setmaxnreg
    # then moves what the loader does not use to the MMA warps
    return min(248, 65536 // (cfg.ctas * (cfg.warps + 4) * 32) // 8 * 8)


def k_steps(w: WQWeight) -> int:
    """64-column K steps of ``w``: a config may split them at most this many ways."""
    return -(-w.k // BLOCK_K)


def launch_args(x: torch.Tensor, w: WQWeight, out: torch.Tensor, cfg: RSConfig):
    """(grid, positional args, keyword args) of one launch with ``cfg``."""
    (tiles,), args = common_args(x, w, out, cfg.block_m, cfg.block_n)
    ws = out   # split-K parts (unused without split-K)
    if cfg.split > 1:
        if cfg.split > k_steps(w):
            raise ValueError(f"{cfg.label}: split {cfg.split} of K={w.k}, which has only "
                             f"{k_steps(w)} steps of {BLOCK_K}")
        check_split_tiles(tiles, cfg.split)
        ws = torch.empty(cfg.split * x.shape[0] * w.n, device=x.device, dtype=torch.float32)
    args = (*args[:5], ws, split_locks(x.device), *args[5:],
            *_layouts(cfg.block_n, cfg.warps), cfg.stages, cfg.split)
    return (tiles * cfg.split,), args, {"num_warps": cfg.warps, "maxnreg": _maxnreg(cfg)}


@functools.lru_cache(maxsize=None)
def _layouts(block_n: int, warps: int) -> tuple:
    return value_layout(block_n, warps), row_layout(block_n, warps)


def launch(x: torch.Tensor, w: WQWeight, out: torch.Tensor, cfg: RSConfig) -> torch.Tensor:
    """One launch with ``cfg`` (no checks beyond the descriptors': call ``can_run``)."""
    grid, args, kwargs = launch_args(x, w, out, cfg)
    _wq_rs_kernel[grid](*args, **kwargs)
    return out

