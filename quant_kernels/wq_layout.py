"""Common kernel layout for integer weight-only formats (``WQWeight``) and its torch oracle.

Every integer format (GGUF Q4_0/Q4_1/Q8_0, AWQ, GPTQ incl. act-order, compressed-tensors,
HQQ) is repacked once at load into one layout so that one family of kernels serves all:

    w[n, k] = q[n, k] * scales[n, k // g] + bias[n, k // g]      (one FMA per weight)

* ``qweight`` int32 ``[N, ceil(Kp * bits / 32)]``, values packed along K, LSB first
  (value ``k`` sits in word ``k // P`` at bit ``(k % P) * bits``, ``P = 32 // bits``).
  ``Kp`` is K rounded up to a multiple of the group; padded values are 0 and the
  kernels mask the matching activations, so results are exact for any K.
* ``scales`` / ``bias`` fp16 or bf16, logical shape ``[N, Gn]`` (``Gn = Kp // g``).
  ``pack_wq`` stores them group-major (``scales.t()`` is contiguous): a K-tile of the
  kernels needs one scale per output row, and group-major makes that one coalesced
  vector load instead of ``BLOCK_N`` scattered 2-byte reads.  Any strides work.
* ``perm`` int32 ``[K]`` or None (GPTQ act-order): stored column ``j`` holds the weights
  of input column ``perm[j]``, so ``y = x[:, perm] @ W_stored.T``.

Conversions (done by the format loaders): AWQ/GPTQ ``(q - z) * s`` -> ``bias = -z * s``;
Q4_1 ``d * q + m`` -> ``bias = m``; Q4_0 ``d * (q - 8)`` -> ``bias = -8 d``; Q8_0 signed
int8 -> ``q + 128`` with ``bias = -128 d``.  2/3-bit formats are widened to 4-bit at
load for now (the kernels only read 4- and 8-bit words; a native 2-bit path would halve
the bytes again).

This module is pure torch (no Triton), so the CPU path and the format loaders can use it
on hosts without Triton.  It also holds what the kernels derive from the layout: which K
tiles fit a group, and the PTX recipes that turn packed words into fp16/bf16 weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, 256)  # or group_size == K (per-channel)
SCALE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class WQWeight:
    """A ``[N, K]`` weight in the common layout (see the module docstring)."""

    qweight: torch.Tensor           # int32 [N, ceil(Kp * bits / 32)]
    scales: torch.Tensor            # fp16/bf16 [N, Gn], group-major in memory
    bias: torch.Tensor              # same dtype/shape as scales
    perm: torch.Tensor | None       # int32 [K] or None
    k: int                          # logical K (activations' width)
    group_size: int
    bits: int
    # Launch configs the autotuner picked for this weight, by (kernel, M bucket, dtype):
    # later calls launch the kernel directly, skipping the autotuner's per-call work; and
    # the Gluon GEMM's TMA descriptors of this weight (gluon_wq_gemm._weight_descs).
    plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @property
    def kp(self) -> int:
        return self.n_groups * self.group_size

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        ts = [self.qweight, self.scales, self.bias] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, device) -> "WQWeight":
        def mv(t):
            return None if t is None else t.to(device)
        # .to() keeps the group-major strides of scales/bias only for dense tensors
        # moved whole, which these are (they are .t() views of contiguous tensors).
        return WQWeight(mv(self.qweight), mv(self.scales), mv(self.bias), mv(self.perm),
                        self.k, self.group_size, self.bits)


def padded_k(k: int, group_size: int) -> int:
    return -(-k // group_size) * group_size


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def perm_from_g_idx(g_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    """GPTQ act-order ``g_idx`` [K] -> ``perm`` making every group contiguous.

    Use as ``perm = perm_from_g_idx(g_idx, g)``, then pass ``q[:, perm]`` and the scales
    in group order to :func:`pack_wq` together with ``perm``.
    """
    _check(g_idx.dim() == 1, f"g_idx must be 1-D, got shape {tuple(g_idx.shape)}")
    perm = torch.argsort(g_idx.to(torch.int64), stable=True)
    sorted_g = g_idx.to(torch.int64)[perm]
    expect = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    _check(bool(torch.equal(sorted_g, expect)),
           f"g_idx does not describe groups of {group_size} columns each")
    return perm.to(torch.int32)


def pack_wq(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, group_size: int,
            bits: int, perm: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float16) -> WQWeight:
    """Repack unsigned integer weights ``q`` [N, K] (< 2**bits) into a :class:`WQWeight`.

    ``scales``/``bias`` are [N, ceil(K / group_size)]; ``q``'s columns are in stored
    order (already permuted when ``perm`` is given).  Raises ValueError on bad input.
    """
    _check(bits in BITS, f"bits must be one of {BITS}, got {bits} (widen 2/3-bit to 4 at load)")
    _check(isinstance(q, torch.Tensor) and q.dim() == 2, "q must be a 2-D tensor [N, K]")
    _check(not q.dtype.is_floating_point and not q.dtype.is_complex and q.dtype != torch.bool,
           f"q must be an integer tensor, got {q.dtype}")
    n, k = q.shape
    _check(n >= 1 and k >= 1, f"empty weight [{n}, {k}]")
    _check(group_size in GROUP_SIZES or group_size == k,
           f"group_size must be one of {GROUP_SIZES} or K={k} (per-channel), got {group_size}")
    _check(dtype in SCALE_DTYPES, f"dtype must be float16 or bfloat16, got {dtype}")
    gn = -(-k // group_size)
    for name, t in (("scales", scales), ("bias", bias)):
        _check(isinstance(t, torch.Tensor) and tuple(t.shape) == (n, gn),
               f"{name} must have shape [N, ceil(K/group)] = [{n}, {gn}], "
               f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        _check(t.dtype.is_floating_point, f"{name} must be floating point, got {t.dtype}")
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    qmin, qmax = int(q.min()), int(q.max())
    _check(qmin >= 0 and qmax < (1 << bits),
           f"q values must lie in [0, {1 << bits}) for {bits}-bit, got [{qmin}, {qmax}]")
    if perm is not None:
        _check(isinstance(perm, torch.Tensor) and perm.dim() == 1 and perm.numel() == k,
               f"perm must be a 1-D tensor of K={k} indices")
        _check(not perm.dtype.is_floating_point, f"perm must be integer, got {perm.dtype}")
        _check(bool(torch.equal(torch.sort(perm.to(torch.int64)).values,
                                torch.arange(k, device=perm.device))),
               "perm must be a permutation of range(K)")
        perm = perm.to(device=q.device, dtype=torch.int32).contiguous()

    kp = gn * group_size
    pack = 32 // bits
    kw = -(-kp * bits // 32)
    qp = torch.zeros(n, kw * pack, dtype=torch.int64, device=q.device)
    qp[:, :k] = q.to(torch.int64)
    shifts = torch.arange(pack, device=q.device, dtype=torch.int64) * bits
    words = (qp.view(n, kw, pack) << shifts).sum(-1)       # disjoint bits: sum == or
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)

    def group_major(t):
        return t.to(dtype).t().contiguous().t()

    return WQWeight(words.contiguous(), group_major(scales), group_major(bias), perm,
                    k, group_size, bits)


def unpack_q(w: WQWeight) -> torch.Tensor:
    """The unsigned values ``q`` [N, Kp] (int32) of a packed weight, stored order."""
    shifts = torch.arange(w.pack, device=w.device, dtype=torch.int32) * w.bits
    vals = (w.qweight.unsqueeze(-1) >> shifts) & ((1 << w.bits) - 1)
    return vals.reshape(w.n, -1)[:, : w.kp]


def dequantize_wq(w: WQWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] in stored column order (fp32 math, then cast to ``dtype``)."""
    q = unpack_q(w)[:, : w.k].float()
    g = torch.arange(w.k, device=w.device) // w.group_size
    wt = q * w.scales.float()[:, g] + w.bias.float()[:, g]
    return wt.to(dtype)


def wq_reference(x: torch.Tensor, w: WQWeight) -> torch.Tensor:
    """Oracle and CPU path: ``x[:, perm] @ W.T`` in fp32, cast to ``x.dtype``."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    xf = x.float()
    if w.perm is not None:
        xf = xf.index_select(-1, w.perm.to(device=x.device, dtype=torch.int64))
    return (xf @ dequantize_wq(w).to(x.device).t()).to(x.dtype)


# ----------------------------------------------------------------------------- tiling
def next_pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def m_bucket(m: int, cap: int) -> int:
    """Autotuning bucket of M: the next power of two, capped."""
    return min(next_pow2(max(m, 1)), cap)


def num_sms(device) -> int:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM


def k_tile_ok(block_k: int, group: int, n_groups: int, kp: int) -> bool:
    """A K tile of the kernels sees one group (BLOCK_K divides the group, or there is
    only one), so it needs one scale and bias per row; and it is no wider than Kp."""
    return (group % block_k == 0 or n_groups == 1) and block_k <= max(32, next_pow2(kp))


def wide_tile_ok(block_k: int, group: int, n_groups: int, kp: int) -> bool:
    """A K tile spanning several whole groups (the kernels' WIDE mode: one scale and bias
    per packed word) fits: the group divides the tile and the tile is no wider than Kp."""
    return (n_groups > 1 and group < block_k and block_k % group == 0
            and block_k <= max(32, next_pow2(kp)))


def check_pinned_k_tile(kwargs: dict, w: WQWeight) -> None:
    """A pinned config's K tile (``BLOCK_K``) must lie in one scale group, unless it is
    WIDE (one scale per packed word).  The autotuners prune the tiles that do not fit; a
    pinned one that spans groups would scale several groups' columns with one group's
    scale (silently wrong results, relative error ~0.5-0.9)."""
    bk = kwargs["BLOCK_K"]
    if kwargs.get("WIDE") or w.n_groups == 1 or w.group_size % bk == 0:
        return
    raise ValueError(f"config BLOCK_K={bk} spans several {w.group_size}-column scale groups "
                     f"(K={w.k}): use a BLOCK_K that divides {w.group_size}, or WIDE")


def widest_k_tiles(group: int, n_groups: int, kp: int) -> set:
    """The decode K tiles worth tuning: the widest that fits (and 128 beside 256)."""
    widest = next(bk for bk in (256, 128, 64, 32) if k_tile_ok(bk, group, n_groups, kp))
    return {widest, 128} if widest == 256 else {widest}


# ----------------------------------------------------------------------------- PTX
# Fast dequant recipes for tl.inline_asm_elementwise (pack=2): two words ($W0, $W1) of
# one row, then the (scale, bias) pairs as f16x2/bf16x2 registers; output p holds value
# p of both words as a 16-bit pair.  The "magic number" conversion: a lop3 puts a value
# under the exponent of 1024.0 (fp16) or 128.0 (bf16), so the pair reads 1024 + q; a
# packed subtract makes it exactly q and one packed FMA gives q * s + b rounded once:
# ~2 instructions per weight against ~4-5 for the fp32 unpack.
def _ptx_f16_u4() -> str:
    # value p is nibble p % 4 of the low (p < 4) or high halves; lo8/hi8 bring nibbles
    # 2-3 down; odd nibbles land 16x too high and an FMA with 1/16, -64 fixes them
    src = ("lo", "lo", "lo8", "lo8", "hi", "hi", "hi8", "hi8")
    body = ["{", ".reg .b32 lo, hi, lo8, hi8, t, q, m1024, s16, m64;",
            "mov.b32 m1024, 0x64006400; mov.b32 s16, 0x2C002C00; mov.b32 m64, 0xD400D400;",
            "prmt.b32 lo, $8, $9, 0x5410; prmt.b32 hi, $8, $9, 0x7632;",
            "shr.b32 lo8, lo, 8; shr.b32 hi8, hi, 8;"]
    for p in range(8):
        if p % 2 == 0:
            body.append(f"lop3.b32 t, {src[p]}, 0x000F000F, 0x64006400, 0xEA; "
                        f"sub.f16x2 q, t, m1024; fma.rn.f16x2 ${p}, q, $10, $11;")
        else:
            body.append(f"lop3.b32 t, {src[p]}, 0x00F000F0, 0x64006400, 0xEA; "
                        f"fma.rn.f16x2 q, t, s16, m64; fma.rn.f16x2 ${p}, q, $10, $11;")
    return "\n".join(body + ["}"])


def _ptx_bf16_u4() -> str:
    # bf16 has 7 mantissa bits, so each nibble is shifted down to bits 0-3 under 128.0
    body = ["{", ".reg .b32 lo, hi, t, q, one, m128;",
            "mov.b32 one, 0x3F803F80; mov.b32 m128, 0xC300C300;",
            "prmt.b32 lo, $8, $9, 0x5410; prmt.b32 hi, $8, $9, 0x7632;"]
    for p in range(8):
        half, sh = ("lo" if p < 4 else "hi"), 4 * (p % 4)
        body.append((f"shr.b32 t, {half}, {sh}; " if sh else f"mov.b32 t, {half}; ")
                    + "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; "
                    f"fma.rn.bf16x2 q, t, one, m128; fma.rn.bf16x2 ${p}, q, $10, $11;")
    return "\n".join(body + ["}"])


def _ptx_f16_u8() -> str:
    # prmt gathers byte p of both words into the low byte of each half (bf16 cannot
    # hold 128 + q for q >= 128: 8-bit with bf16 activations keeps the fp32 unpack)
    body = ["{", ".reg .b32 t, q, m1024;", "mov.b32 m1024, 0x64006400;"]
    for p in range(4):
        sel = hex((4 + p) << 12 | (4 + p) << 8 | p << 4 | p)
        body.append(f"prmt.b32 t, $4, $5, {sel}; lop3.b32 t, t, 0x00FF00FF, 0x64006400, 0xEA; "
                    f"sub.f16x2 q, t, m1024; fma.rn.f16x2 ${p}, q, $6, $7;")
    return "\n".join(body + ["}"])


PTX_F16_U4 = _ptx_f16_u4()
PTX_BF16_U4 = _ptx_bf16_u4()
PTX_F16_U8 = _ptx_f16_u8()
