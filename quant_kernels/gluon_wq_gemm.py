"""Warp-specialized dequant GEMM for ``WQWeight`` on Hopper (Gluon): the mid-M kernel.

At M = 128..2048 a 4-bit GEMM on the H100 is compute-bound like cuBLAS, so it has to keep
the tensor cores as busy as cuBLAS does *and* dequantize.  The Triton kernels
(``triton_wq_gemm``, and the weight-stationary swap with wgmma's A from registers) do both
in the same warps, one after the other, and plateau at 0.5-0.6x cuBLAS (BENCHMARKS.md,
sessions 3 and 7).  Here three groups of warps run side by side on one CTA, handing tiles
over through a ring of ``STAGES`` shared-memory slots guarded by mbarriers:

* loader (1 warp): TMA copies of the activation tile ``x[BM, BK]``, the packed weight
  tile ``qweight[BN, BK / pack]`` and the scale and bias rows of the tile's group;
* dequant (4 warps): packed words -> ``q * s + b`` (magic-number PTX on fp16/bf16 pairs,
  ~2 instructions per value, rounded once; fp32 math for 8-bit bf16) -> an fp16/bf16
  ``[BN, BK]`` tile in wgmma's swizzled layout;
* MMA (the kernel's ``num_warps``, 1-2 warpgroups): ``wgmma`` with both operands from
  shared memory, one tile in flight, releasing each slot when its MMA has retired.

Per slot: ``ready`` (TMA bytes landed), ``dq_ready`` (dequantized tile stored) and
``empty`` (MMA done: the loader may refill the slot and the dequant warps rewrite it).
mbarriers start with phase 1 complete, so the first round's waits on ``empty`` pass.

Zero padding does the edges: TMA fills rows >= M and columns >= K of ``x`` with zeros, so
the padded weight columns (q = 0, w = bias) and the rows past N (masked at the store)
never reach the result.  Groups must hold whole K tiles (``BK`` = 64); groups of 32
(GGUF Q4_0/Q4_1) are left to the other kernels.  Gluon does not run under
``TRITON_INTERPRET``: this kernel is checked by the GPU tests against ``wq_reference``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .wq_layout import WQWeight

try:  # Gluon ships with Triton >= 3.5
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAS_GLUON = True
except ImportError:  # pragma: no cover - older Triton: the Triton kernels serve all M
    HAS_GLUON = False

BLOCK_K = 64          # one 128-byte swizzle row of fp16: wgmma's K-major operand tile
MAX_M_BUCKET = 4096   # tuned picks are kept per power-of-two M bucket up to here


@dataclass(frozen=True)
class WSConfig:
    """One launch config: ``BM x BN`` output tile, MMA warps, ring depth."""

    block_m: int
    block_n: int
    warps: int
    stages: int

    def __post_init__(self):
        if self.block_m not in (64, 128, 256) or self.block_n not in (64, 128):
            # BN = 256 needs ~154 registers per MMA thread: more than a launch of 16 warps
            # (the warp-specialized layout) can start with
            raise ValueError(f"tile {self.block_m}x{self.block_n}: BM in 64/128/256, "
                             "BN in 64/128")
        if self.warps not in (4, 8) or self.block_m < 16 * self.warps:
            raise ValueError(f"{self.warps} MMA warps with BM={self.block_m}: 4 or 8 warps, "
                             "at least 16 rows each")
        if not 2 <= self.stages <= 6:
            raise ValueError(f"stages={self.stages}: 2..6 ring slots")

    @property
    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}w{self.warps}s{self.stages}"

    @classmethod
    def from_label(cls, label: str) -> "WSConfig":
        """The config ``label`` names (``128x128w4s4``)."""
        try:
            tile, rest = label.split("w")
            bm, bn = map(int, tile.split("x"))
            warps, stages = map(int, rest.split("s"))
        except ValueError:
            raise ValueError(f"config label {label!r}: expected BMxBNw<warps>s<stages>, "
                             "e.g. 128x128w4s4") from None
        return cls(bm, bn, warps, stages)

    def smem_bytes(self, bits: int, elt: int = 2) -> int:
        per = (self.block_m * BLOCK_K * elt + self.block_n * BLOCK_K * elt
               + self.block_n * BLOCK_K * bits // 8 + 2 * self.block_n * elt)
        return self.stages * per + 512   # + barriers and alignment (compiled: < 200)


# Candidates timed on a shape's first call (BENCHMARKS.md, session 9, for the sweep).
CONFIGS = tuple(WSConfig(*c) for c in (
    (64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 4, 4), (128, 128, 8, 4),
    (256, 128, 8, 3), (256, 128, 8, 4)))
SMEM_LIMIT = 227 * 1024   # H100 opt-in shared memory per block


# ----------------------------------------------------------------------------- PTX
# One packed word -> its values in natural K order as 16-bit pairs, ``q * s + b`` rounded
# once (for gl.inline_asm_elementwise with pack = values per word).  Registers: the pairs
# out first, then the word (repeated by the broadcast), the (s, s) and (b, b) pairs, and an
# unused full-width operand that gives the op its shape.  Same "magic number" idea as
# wq_layout's recipes (a lop3 puts a value under the exponent of 1024.0 / 128.0), but
# pairing neighbours (2j, 2j + 1), which a K-major shared-memory tile needs: a prmt copies
# byte j into both halves, so the low half's nibble is value 2j and the high half's value
# 2j + 1 (16x too high in fp16, fixed by the FMA with (1, 1/16); bf16 has too few
# mantissa bits for that, so its high half is shifted down first).
def _ptx_nat(bits: int, bf16: bool) -> str:
    pairs = 32 // bits // 2
    w, s, b = f"${pairs}", f"${3 * pairs}", f"${4 * pairs}"
    body = ["{", ".reg .b32 t, u, mul, add;"]
    if bits == 8:
        body.append("mov.b32 mul, 0x3C003C00; mov.b32 add, 0xE400E400;")
    elif bf16:
        body.append("mov.b32 mul, 0x3F803F80; mov.b32 add, 0xC300C300;")
    else:
        body.append("mov.b32 mul, 0x2C003C00; mov.b32 add, 0xD400E400;")
    for j in range(pairs):
        if bits == 8:   # bytes 2j, 2j + 1 under 1024.0
            body.append(f"prmt.b32 t, {w}, 0, {hex(0x4040 | (2 * j + 1) << 8 | 2 * j)}; "
                        "lop3.b32 t, t, 0x00FF00FF, 0x64006400, 0xEA; "
                        f"fma.rn.f16x2 t, t, mul, add; fma.rn.f16x2 ${j}, t, {s}, {b};")
        elif bf16:      # low nibble of byte j in the low half, high nibble in the high half
            body.append(f"prmt.b32 t, {w}, 0, {hex(0x4040 | j << 8 | j)}; shr.b32 u, t, 4; "
                        "prmt.b32 t, t, u, 0x7610; "
                        "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; "
                        f"fma.rn.bf16x2 t, t, mul, add; fma.rn.bf16x2 ${j}, t, {s}, {b};")
        else:
            body.append(f"prmt.b32 t, {w}, 0, {hex(0x4040 | j << 8 | j)}; "
                        "lop3.b32 t, t, 0x00F0000F, 0x64006400, 0xEA; "
                        f"fma.rn.f16x2 t, t, mul, add; fma.rn.f16x2 ${j}, t, {s}, {b};")
    return "\n".join(body + ["}"])


def _ptx_constraints(bits: int) -> str:
    pack = 32 // bits
    return ",".join(["=r"] * (pack // 2) + ["r"] * (pack + pack // 2 * 2 + pack))


# ----------------------------------------------------------------------------- kernel
if HAS_GLUON:
    _PTX_F16_U4 = gl.constexpr(_ptx_nat(4, False))
    _PTX_BF16_U4 = gl.constexpr(_ptx_nat(4, True))
    _PTX_F16_U8 = gl.constexpr(_ptx_nat(8, False))
    _PTX_C_U4 = gl.constexpr(_ptx_constraints(4))
    _PTX_C_U8 = gl.constexpr(_ptx_constraints(8))

    @gluon.jit
    def _load_part(descs, ring, ready, empty, off_m, off_n, k_first, k_iters, group):
        """Loader warp: refill slot ``i % STAGES`` with K step ``k_first + i`` (a split-K
        CTA's steps start past 0) as soon as the MMA has
        released it (a warp of its own: issuing the copies from the MMA warps, after each
        wgmma wait, was 10-20% slower at M >= 512, BENCHMARKS.md session 9).  Shared with
        ``gluon_wq_rs``, whose ring holds the same four tiles."""
        x_desc, w_desc, s_desc, b_desc = descs
        x_bufs, w_bufs, s_bufs, b_bufs = ring
        STAGES: gl.constexpr = x_bufs.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        KW: gl.constexpr = w_desc.block_type.shape[1]
        NBYTES: gl.constexpr = (x_desc.block_type.nbytes + w_desc.block_type.nbytes
                                + 2 * s_desc.block_type.nbytes)
        for i in range(k_iters):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, NBYTES)
            k0 = (k_first + i) * BK
            tma.async_copy_global_to_shared(x_desc, [off_m, k0], bar, x_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [off_n, (k_first + i) * KW], bar,
                                            w_bufs.index(s))
            tma.async_copy_global_to_shared(s_desc, [k0 // group, off_n], bar, s_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [k0 // group, off_n], bar, b_bufs.index(s))

    @gluon.jit
    def _dequant_part(descs, bufs, bars, off_m, off_n, k_iters, group):
        """Dequant warpgroup: packed tile -> ``q * s + b`` -> the MMA's weight tile."""
        x_desc, w_desc, s_desc, b_desc = descs
        x_bufs, w_bufs, s_bufs, b_bufs, dq_bufs = bufs
        ready, dq_ready, empty = bars
        STAGES: gl.constexpr = x_bufs.shape[0]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        KW: gl.constexpr = w_desc.block_type.shape[1]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        PACK: gl.constexpr = BK // KW
        BITS: gl.constexpr = 32 // PACK
        IS_BF16: gl.constexpr = dq_bufs.dtype == gl.bfloat16
        FAST: gl.constexpr = not (IS_BF16 and BITS == 8)
        # a thread owns whole words: its PACK values are PACK consecutive K columns, so the
        # unpacked tile leaves registers as one 16-byte (4-bit) or 8-byte store per word
        L3: gl.constexpr = gl.BlockedLayout([1, 1, PACK], [32 // KW, KW, 1], [4, 1, 1],
                                            [2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(2, L3)
        shifts = gl.arange(0, PACK, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3))) * BITS
        shifts = gl.expand_dims(gl.expand_dims(shifts, 0), 0)
        for i in range(k_iters):
            s = i % STAGES
            phase = (i // STAGES) & 1
            mbarrier.wait(ready.index(s), phase)
            words = w_bufs.index(s).load(LW)
            sc = s_bufs.index(s).permute((1, 0)).load(LW)   # [BN, 1]
            bi = b_bufs.index(s).permute((1, 0)).load(LW)
            w3, s3, b3 = gl.expand_dims(words, 2), gl.expand_dims(sc, 2), gl.expand_dims(bi, 2)
            if FAST:   # ~2-3 instructions per value (PTX above)
                if BITS == 8:
                    w = gl.inline_asm_elementwise(_PTX_F16_U8, _PTX_C_U8, [w3, s3, b3, shifts],
                                                  dtype=gl.float16, is_pure=True, pack=PACK)
                elif IS_BF16:
                    w = gl.inline_asm_elementwise(_PTX_BF16_U4, _PTX_C_U4, [w3, s3, b3, shifts],
                                                  dtype=gl.bfloat16, is_pure=True, pack=PACK)
                else:
                    w = gl.inline_asm_elementwise(_PTX_F16_U4, _PTX_C_U4, [w3, s3, b3, shifts],
                                                  dtype=gl.float16, is_pure=True, pack=PACK)
            else:      # 8-bit bf16 (128 + q is not exact in bf16): fp32 math
                q = (w3 >> shifts) & ((1 << BITS) - 1)
                # exact int -> fp32 without I2F: q under the exponent of 2**23
                qf = (q | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
                w = (qf * s3.to(gl.float32) + b3.to(gl.float32)).to(dq_bufs.dtype)
            w = gl.reshape(w, [BN, BK])
            mbarrier.wait(empty.index(s), phase ^ 1)    # the MMA of the last round is done
            dq_bufs.index(s).store(w)
            fence_async_shared()   # generic-proxy writes before wgmma / TMA reuse the slot
            mbarrier.arrive(dq_ready.index(s), count=1)

    @gluon.jit
    def _mma_part(bufs, bars, k_iters, out_ptr, off_m, off_n, M, N, stride_om,
                  BM: gl.constexpr, BN: gl.constexpr, num_warps: gl.constexpr):
        """MMA warps: ``acc += x_tile @ w_tile.T`` per slot, then the masked store."""
        x_bufs, w_bufs, s_bufs, b_bufs, dq_bufs = bufs
        ready, dq_ready, empty = bars
        STAGES: gl.constexpr = x_bufs.shape[0]
        ACC: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])
        acc = gl.zeros([BM, BN], gl.float32, ACC)
        for i in range(k_iters):
            s = i % STAGES
            phase = (i // STAGES) & 1
            mbarrier.wait(ready.index(s), phase)
            mbarrier.wait(dq_ready.index(s), phase)
            acc = warpgroup_mma(x_bufs.index(s), dq_bufs.index(s).permute((1, 0)), acc,
                                is_async=True)
            # one MMA in flight: step i - 1 has retired, so its slot is free for the
            # loader and the dequant warps
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, ACC))
        ptrs = out_ptr + gl.expand_dims(rows, 1) * stride_om + gl.expand_dims(cols, 0)
        mask = gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < N, 0)
        gl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _tile_start(M, BM: gl.constexpr, BN: gl.constexpr):
        """(off_m, off_n) of this CTA's output tile.  M tiles fastest: CTAs running
        together share a weight tile (read once from DRAM)."""
        pid = gl.program_id(0)
        num_m = gl.cdiv(M, BM)
        return (pid % num_m) * BM, (pid // num_m) * BN

    @gluon.jit
    def _alloc_ring(x_desc, w_desc, s_desc, b_desc, STAGES: gl.constexpr):
        """The ring the loader warp fills (``_load_part``): ``STAGES`` slots of the four
        TMA tiles, and their ``ready`` / ``empty`` mbarriers, initialized."""
        x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape,
                                           x_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape,
                                           w_desc.layout)
        s_bufs = gl.allocate_shared_memory(s_desc.dtype, [STAGES] + s_desc.block_type.shape,
                                           s_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape,
                                           b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        return (x_bufs, w_bufs, s_bufs, b_bufs), ready, empty

    @gluon.jit
    def _wq_ws_kernel(x_desc, w_desc, s_desc, b_desc, out_ptr,   # TMA descriptors, output
                      M, N, K, group, stride_om,                   # sizes, group, out stride
                      DQ_LAYOUT: gl.constexpr, STAGES: gl.constexpr, DQ_REGS: gl.constexpr,
                      num_warps: gl.constexpr):
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        off_m, off_n = _tile_start(M, BM, BN)
        ring, ready, empty = _alloc_ring(x_desc, w_desc, s_desc, b_desc, STAGES)
        x_bufs, w_bufs, s_bufs, b_bufs = ring
        dq_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BN, BK], DQ_LAYOUT)
        dq_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(dq_ready.index(i), count=1)

        descs = (x_desc, w_desc, s_desc, b_desc)
        bufs = (x_bufs, w_bufs, s_bufs, b_bufs, dq_bufs)
        bars = (ready, dq_ready, empty)
        k_iters = gl.cdiv(K, BK)
        gl.warp_specialize([
            (_mma_part, (bufs, bars, k_iters, out_ptr, off_m, off_n, M, N, stride_om, BM, BN,
                         num_warps)),
            (_load_part, (descs, ring, ready, empty, off_m, off_n, 0, k_iters, group)),
            (_dequant_part, (descs, bufs, bars, off_m, off_n, k_iters, group)),
        ], [1, 4], [24, DQ_REGS])


# ----------------------------------------------------------------------------- host
def weight_refusal(w: WQWeight, device) -> str:
    """Why this kernel cannot take weight ``w`` on ``device`` ("" if it can): the checks
    that do not depend on the activations (``inspect`` shows them)."""
    if w.bits not in (4, 8):
        return f"{w.bits}-bit weight (4- or 8-bit only)"
    if w.dtype not in (torch.float16, torch.bfloat16):
        return f"scales in {w.dtype} (fp16 or bf16)"
    if w.n_groups > 1 and w.group_size % BLOCK_K:
        return f"group {w.group_size}: a {BLOCK_K}-column K tile must lie in one group"
    if (w.kp * w.bits // 8) % 16 or w.n % 8:
        return f"K={w.kp} / N={w.n}: TMA needs 16-byte rows (K % 32, N % 8)"
    if w.qweight.stride(1) != 1 or w.qweight.data_ptr() % 16:
        return "packed weight rows not 16-byte aligned"
    for t in (w.scales, w.bias):
        # [N, Gn] group-major; a size-1 dim's stride is arbitrary (torch sets 1)
        if t.stride(0) != 1 or (w.n_groups > 1 and t.stride(1) != w.n) or t.data_ptr() % 16:
            return "scales/bias not group-major and 16-byte aligned"
    if not HAS_GLUON:
        return "this Triton has no Gluon (triton.experimental.gluon, Triton >= 3.5)"
    device = torch.device(device)
    if device.type != "cuda":
        return "Gluon kernels need a CUDA device (no TRITON_INTERPRET)"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "needs sm_90 (Hopper wgmma and TMA)"
    return ""


def activation_refusal(x: torch.Tensor, w: WQWeight) -> str:
    """Why the activations ``x`` cannot be a TMA operand next to ``w`` ("" if they can):
    shared by both Gluon GEMMs."""
    if x.dtype not in (torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        return f"activations {x.dtype}, scales {w.dtype} (fp16 or bf16, alike)"
    if x.stride(-1) != 1 or (x.stride(0) * 2) % 16 or x.data_ptr() % 16 or w.k % 8:
        return "activation rows not contiguous and 16-byte aligned (K % 8)"
    return ""


def can_run(x: torch.Tensor, w: WQWeight) -> tuple[bool, str]:
    """Whether this kernel takes (x, w), and why not."""
    why = activation_refusal(x, w) or weight_refusal(w, x.device)
    return not why, why


def _fits(cfg: WSConfig, w: WQWeight) -> bool:
    return cfg.smem_bytes(w.bits) <= SMEM_LIMIT


@functools.lru_cache(maxsize=None)
def _smem_layout(block: tuple, dtype):
    """wgmma/TMA's swizzled layout of a ``block`` tile (immutable: built once per shape)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def _weight_descs(w: WQWeight, bn: int) -> tuple:
    """TMA descriptors of the packed words, scales and biases for ``BN``-row tiles, built
    once per weight (``w.plans``): they do not change between calls, and building them is
    ~45 of the ~60 us of Python a launch otherwise costs."""
    key = ("ws-descs", bn)
    descs = w.plans.get(key)
    if descs is None:
        kw = BLOCK_K * w.bits // 32
        w_desc = TensorDescriptor.from_tensor(w.qweight, [bn, kw],
                                              _smem_layout((bn, kw), gl.int32))
        row = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
        s_desc, b_desc = (TensorDescriptor(t, [w.n_groups, w.n], [w.n, 1], [1, bn], row)
                          for t in (w.scales, w.bias))
        descs = w.plans[key] = (w_desc, s_desc, b_desc)
    return descs


def common_args(x: torch.Tensor, w: WQWeight, out: torch.Tensor, bm: int, bn: int):
    """(grid, leading arguments) of a ``BM x BN``-tile launch of either Gluon GEMM: the
    four TMA descriptors, the output, sizes, group and output stride."""
    m = x.shape[0]
    x_desc = TensorDescriptor.from_tensor(
        x, [bm, BLOCK_K], _smem_layout((bm, BLOCK_K), _GL_DTYPES[x.dtype]))
    grid = (triton.cdiv(m, bm) * triton.cdiv(w.n, bn),)
    return grid, (x_desc, *_weight_descs(w, bn), out, m, w.n, w.k, w.group_size,
                  out.stride(0))


def launch_args(x: torch.Tensor, w: WQWeight, out: torch.Tensor, cfg: WSConfig):
    """(grid, positional args, keyword args) of one launch with ``cfg``."""
    grid, args = common_args(x, w, out, cfg.block_m, cfg.block_n)
    args += (_smem_layout((cfg.block_n, BLOCK_K), _GL_DTYPES[x.dtype]), cfg.stages, DQ_REGS)
    return grid, args, {"num_warps": cfg.warps, "maxnreg": _maxnreg(cfg)}


def launch(x: torch.Tensor, w: WQWeight, out: torch.Tensor, cfg: WSConfig) -> torch.Tensor:
    """One launch with ``cfg`` (no checks beyond the descriptors': call ``can_run``)."""
    grid, args, kwargs = launch_args(x, w, out, cfg)
    _wq_ws_kernel[grid](*args, **kwargs)
    return out


DQ_REGS = 128   # registers per dequant thread (a tile's 8 words, their values, addresses)


def _maxnreg(cfg: WSConfig) -> int:
    # every warp is allocated at launch (registers go by warpgroup): the MMA warps, the
    # loader's and the dequant warpgroups; inside, setmaxnreg hands the MMA warps what the
    # loader and dequant warps do not use
    return min(256, (65536 // ((cfg.warps + 8) * 32)) // 8 * 8)


if HAS_GLUON:
    _GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def candidates(x: torch.Tensor, w: WQWeight) -> dict:
    """Label -> launch of every config that takes (x, w): this kernel's, and for 4-bit
    weights those of ``gluon_wq_rs`` (the weight as wgmma's register operand), which win
    from M = 64 to ~256 (BENCHMARKS.md, session 10)."""
    from . import gluon_wq_rs as rs
    fns = {c.label: functools.partial(launch, cfg=c) for c in CONFIGS if _fits(c, w)}
    if rs.can_run(x, w)[0]:
        fns.update({c.label: functools.partial(rs.launch, cfg=c)
                    for c in rs.CONFIGS if rs.fits(c)})
    return fns


def ws_matmul(x: torch.Tensor, w: WQWeight, out: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` into ``out`` with the Gluon config tuned for this shape's M bucket:
    every candidate timed on the first call (``triton_wq_tile.timed_choice``, the same
    cache as ``wq_matmul``'s kernel choices).  A first call inside a CUDA-graph capture
    cannot time: it takes the first candidate, untuned (run each M bucket eagerly before
    capturing, as the engine does)."""
    from .triton_wq_tile import timed_choice
    # built once per weight: which configs take it depends on the weight alone once
    # can_run(x, w) has passed, as it has on wq_matmul's path here
    fns = w.plans.get("gluon-candidates")
    if fns is None:
        fns = w.plans["gluon-candidates"] = candidates(x, w)
    label = timed_choice(x, w, out, fns, MAX_M_BUCKET, next(iter(fns)))
    return fns[label](x, w, out)
