"""GGUF K-quants with 16-value sub-blocks (Q6_K, Q3_K, Q2_K) in the layout of the
``triton_g16`` kernels, and its torch oracle.  Pure torch (no Triton), like wq_layout.

These types scale every 16 values, which the common ``WQWeight`` layout (groups of 32 and
up, one fp16 scale per group) cannot hold, so they get their own layout, built once at
load from the GGUF blocks (the value order and bit fields follow ``dequantize_row_q6_K`` /
``_q3_K`` / ``_q2_K`` of ggml-quants.c, through the same gguf-py idioms as gguf_ref):

    w[n, k] = d[n, k // 256] * sc[n, k // 16] * (q[n, k] - zero)
              - dmin[n, k // 256] * mn[n, k // 16]                     (Q2_K only)

* ``qlo`` int32 ``[N, K / 8]``: bits ``4p..4p+3`` of word ``w`` are the low 4 bits of
  value ``8w + p`` (LSB first, as in wq_layout).
* ``qhi`` int16 ``[N, K / 8]`` or None: bits ``2p, 2p+1`` of word ``w`` are the high two
  bits of value ``8w + p`` (Q6_K's 6-bit values).  Same word index as ``qlo``, so one
  unpack step gives a slice of whole values.
* ``sc`` (and ``mn``) int8 ``[N, K / 16]``, row-major like the words (a K tile's scales
  are one contiguous run per row); ``d`` (and ``dmin``) fp16 ``[N, K / 256]``, group-major
  (a tile lies in one super-block, so it reads one ``d`` per row: one coalesced load).
  These are the GGUF scales as stored (Q3_K's 6-bit scales minus 32).

Q6_K takes 128 + 64 + 16 + 2 = 210 bytes per 256 values, as in the GGUF file.  Q3_K keeps
its 3-bit values in nibbles (146 bytes against 110), Q2_K its 2-bit values (164 against
84).  Keeping the int8 scales (rather than fp16 products ``d * sc``) makes
:func:`dequantize_g16` bit-identical to ``gguf.quants.dequantize`` for Q6_K and Q3_K:
``d * sc`` is exact in fp32 (11 + 8 significant bits) and the product with ``q - zero``
is rounded once, as there.  Q2_K's ``- dmin * m`` is one more fp32 rounding there and here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from gguf.constants import GGMLQuantizationType as Q

from .gguf_ref_base import f16, split_bits

SUB = 16     # values per scale
SUPER = 256  # values per d (one GGUF super-block)
# (bytes per 256-value block, zero point, has the 2 high bits in qhi); Q2_K has mins
TYPES = {Q.Q6_K: (210, 32, True), Q.Q3_K: (110, 4, False), Q.Q2_K: (84, 0, False)}
SUPPORTED = tuple(TYPES)


@dataclass(frozen=True)
class G16Weight:
    """A ``[N, K]`` weight in the 16-value sub-block layout (see the module docstring)."""

    qlo: torch.Tensor              # int32 [N, K / 8]
    qhi: torch.Tensor | None       # int16 [N, K / 8] (Q6_K)
    sc: torch.Tensor               # int8 [N, K / 16]
    d: torch.Tensor                # fp16 [N, K / 256], group-major
    mn: torch.Tensor | None        # int8 [N, K / 16] (Q2_K)
    dmin: torch.Tensor | None      # fp16 [N, K / 256], group-major (Q2_K)
    k: int
    zero: int
    # autotuned launch configs by (kernel, M bucket, dtype), as WQWeight.plans
    plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        return self.qlo.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qlo.device

    def tensors(self) -> list[torch.Tensor]:
        """The stored tensors (memory accounting)."""
        return [t for t in (self.qlo, self.qhi, self.sc, self.d, self.mn, self.dmin)
                if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device) -> G16Weight:
        # .to() keeps the group-major strides of d / dmin: dense .t() views
        def mv(t):
            return None if t is None else t.to(device)
        return G16Weight(mv(self.qlo), mv(self.qhi), mv(self.sc), mv(self.d), mv(self.mn),
                         mv(self.dmin), self.k, self.zero)


def _pack(vals: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] values < 2**bits -> words of ``8`` values each, LSB first, as ``dtype``."""
    n, k = vals.shape
    shifts = torch.arange(8, dtype=torch.int64, device=vals.device) * bits
    words = (vals.to(torch.int64).reshape(n, k // 8, 8) << shifts).sum(-1)  # disjoint bits
    top = 1 << (8 * bits)
    words = torch.where(words >= top // 2, words - top, words)  # two's complement view
    return words.to(dtype)


def _group_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _fields(blocks: torch.Tensor, qtype: Q):
    """(q [n, 256] uint8, sc [n, 16] int8, d [n, 1] fp32, mn, dmin) of GGUF blocks."""
    n = blocks.shape[0]
    if qtype == Q.Q6_K:
        # ql[128] | qh[64] | int8 scales[16] | fp16 d (block_q6_K)
        ql = split_bits(blocks[:, :128].reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
        qh = split_bits(blocks[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 8, 32)
        q = (ql | (qh << 4)).reshape(n, 256)
        return q, blocks[:, 192:208].view(torch.int8), f16(blocks, 208), None, None
    if qtype == Q.Q3_K:
        # hmask[32] | qs[64] | scales[12] (16 x 6-bit) | fp16 d (block_q3_K); ggml's
        # q = ql - 4 * !hbit is (ql | hbit << 2) - 4
        hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
        lo = split_bits(scales[:, :8], [0, 4], 0x0F).reshape(n, 16)
        hi = split_bits(scales[:, 8:12], [0, 2, 4, 6], 0x03).reshape(n, 16)
        sc = ((lo | (hi << 4)).to(torch.int16) - 32).to(torch.int8)
        ql = split_bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 256)
        qh = split_bits(hmask.reshape(n, 1, 32), range(8), 1).reshape(n, 256)
        return ql | (qh << 2), sc, f16(blocks, 108), None, None
    # Q2_K: scales[16] (4-bit scale | 4-bit min << 4) | qs[64] | fp16 d | fp16 dmin
    scales = blocks[:, :16]
    q = split_bits(blocks[:, 16:80].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 256)
    return (q, (scales & 0x0F).view(torch.int8), f16(blocks, 80),
            (scales >> 4).view(torch.int8), f16(blocks, 82))


def to_g16(raw: torch.Tensor, ggml_type: int, k: int) -> G16Weight:
    """GGUF bytes ``uint8 [N, K / 256 * type_size]`` of Q6_K/Q3_K/Q2_K -> G16Weight (same
    device; the bit unpacking runs on the CPU)."""
    qtype = Q(int(ggml_type))
    if qtype not in TYPES:
        raise ValueError(f"GGML {qtype.name} has no 16-value sub-block layout "
                         f"(supported: {', '.join(t.name for t in SUPPORTED)})")
    size, zero, has_hi = TYPES[qtype]
    n = raw.shape[0]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or k % SUPER or raw.shape[1] * SUPER != k * size:
        raise ValueError(f"{qtype.name} weight must be uint8 [N, K / 256 * {size}] with K a "
                         f"multiple of 256, got {raw.dtype} {tuple(raw.shape)} for K={k}")
    device = raw.device
    blocks = raw.cpu().contiguous().reshape(-1, size)
    q, sc, d, mn, dmin = _fields(blocks, qtype)
    q = q.reshape(n, k).to(torch.int32)
    qlo = _pack(q & 0x0F, 4, torch.int32)
    qhi = _pack(q >> 4, 2, torch.int16) if has_hi else None

    def per_sub(t):
        return None if t is None else t.reshape(n, k // SUB).contiguous()

    def per_super(t):  # fp16 read from fp16: exact
        return None if t is None else _group_major(t.to(torch.float16).reshape(n, k // SUPER))
    w = G16Weight(qlo, qhi, per_sub(sc), per_super(d), per_sub(mn), per_super(dmin), k, zero)
    return w.to(device)


def unpack_q(w: G16Weight) -> torch.Tensor:
    """The unsigned values ``q`` [N, K] (int32)."""
    sh = torch.arange(8, device=w.device, dtype=torch.int32)
    q = (w.qlo.unsqueeze(-1) >> (4 * sh)) & 0x0F
    if w.qhi is not None:
        q = q | (((w.qhi.to(torch.int32).unsqueeze(-1) >> (2 * sh)) & 3) << 4)
    return q.reshape(w.n, w.k)


def dequantize_g16(w: G16Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K]: fp32 math in gguf-py's order, then cast to ``dtype``."""
    sub = torch.arange(w.k, device=w.device) // SUB
    sup = torch.arange(w.k, device=w.device) // SUPER
    dl = w.d.float()[:, sup] * w.sc.float()[:, sub]
    wt = dl * (unpack_q(w) - w.zero).float()
    if w.mn is not None:
        wt = wt - w.dmin.float()[:, sup] * w.mn.float()[:, sub]
    return wt.to(dtype)


def g16_reference(x: torch.Tensor, w: G16Weight) -> torch.Tensor:
    """Oracle and CPU path: ``x @ W.T`` in fp32, cast to ``x.dtype``."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    return (x.float() @ dequantize_g16(w).to(x.device).t()).to(x.dtype)


# ----------------------------------------------------------------------------- PTX
def ptx_f16(has_hi: bool, zero: int) -> str:
    """fp16 dequant recipe for tl.inline_asm_elementwise (pack=2): inputs two lo words
    ($8, $9), two hi words ($10, $11; unused without the high pair), then ``s`` and
    ``b`` as f16x2 ($12, $13); output ``$p`` = value p of both words, ``(q - zero) s + b``
    as f16x2.

    The magic-number conversion (as wq_layout's recipes): one lop3 puts nibble p of each
    16-bit half under the exponent of 1024.0, a second ORs the high pair in above it
    (bits 4-5), so the half reads ``1024 + q`` exactly; a packed subtract of
    ``1024 + zero`` leaves ``q - zero`` exactly and one packed FMA rounds
    ``(q - zero) s + b`` once: ~3 instructions per weight.
    """
    zmag = 0x6400 + zero  # fp16 1024 + zero, exact for zero < 1024
    body = ["{", ".reg .b32 lo, hi, hh, t, u, q, zm;",
            f"mov.b32 zm, {hex(zmag << 16 | zmag)};",
            # low halves (values 0-3) / high halves (4-7) of the two words, one per half
            "prmt.b32 lo, $8, $9, 0x5410; prmt.b32 hi, $8, $9, 0x7632;"]
    if has_hi:
        body.append("prmt.b32 hh, $10, $11, 0x5410;")
    for p in range(8):
        src, j = ("lo" if p < 4 else "hi"), p % 4
        line = (f"shr.b32 t, {src}, {4 * j}; lop3.b32 t, t, " if j else
                f"lop3.b32 t, {src}, ") + "0x000F000F, 0x64006400, 0xEA; "
        if has_hi:  # pair p sits at bits 2p of each half: move it to bits 4-5
            sh = 4 - 2 * p
            line += (f"shl.b32 u, hh, {sh}; lop3.b32 t, u, " if sh > 0 else
                     f"shr.b32 u, hh, {-sh}; lop3.b32 t, u, " if sh < 0 else
                     "lop3.b32 t, hh, ") + "0x00300030, t, 0xEA; "
        line += f"sub.f16x2 q, t, zm; fma.rn.f16x2 ${p}, q, $12, $13;"
        body.append(line)
    return "\n".join(body + ["}"])
