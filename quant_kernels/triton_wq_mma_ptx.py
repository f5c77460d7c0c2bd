"""PTX of ``triton_wq_mma`` (the M <= 16 tensor-core decode kernel): 16-byte weight loads
and the per-slab unpack + ``mma.sync`` blocks, as strings for ``tl.inline_asm_elementwise``.
The fragment layout they assume is described in ``triton_wq_mma``'s docstring.

Two ways of applying the scale groups:

* slab-scaled (groups of a multiple of 128, or per-channel): the A fragments are the exact
  integers ``q`` (one packed subtract of the magic number); the block returns the slab's
  sums ``D = sum q * x`` and ``X = sum x`` (one more MMA with an all-ones A), and the
  kernel adds ``s * D + b * X`` in fp32.
* lane-scaled (groups of 32 or 64, e.g. GGUF Q4_0/Q4_1/Q8_0, HQQ): a lane's columns of a
  slab lie in one group, but one MMA sums the columns of four lanes, i.e. of up to four groups,
  so the scale cannot be applied to the sums.  The A fragments are the dequantized weights
  instead, ``fma.rn.{f16,bf16}x2(q, s, b)`` with the lane's own scale and bias (one rounding
  to the activation dtype, as the other kernels of the common layout round), and the
  block returns ``D = sum w * x`` only.

4-bit words hold 8 columns (a slab is 128 columns, 32 per lane, 8 MMAs); 8-bit words hold
4 (a slab is 64 columns, 16 per lane, 4 MMAs), unpacked by one ``prmt`` that puts each
byte under the fp16 magic exponent (``0x64XX`` is ``1024 + XX``).  bf16 has no exact
``128 + q`` for q >= 128, so 8-bit blocks are fp16 only.
"""
from __future__ import annotations

import functools

import triton.language as tl

# One row tile per warp: the operand lists stay short enough to write out in the kernel.
# Words: words 4q..4q+3 of row r, then of row r + 8 (16-byte loads that bypass L1: every
# weight byte is read once).
# One slab: $0..$7 (row r, then r + 8), addresses $8, $9.
ASM_LOAD1 = tl.constexpr(
    "ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$8];\n"
    "ld.global.nc.L1::no_allocate.v4.b32 {$4, $5, $6, $7}, [$9];")
# Two slabs: $0..$7 slab a (row r, then r + 8), $8..$15 slab b; addresses $16..$19.
ASM_LOAD2 = tl.constexpr("\n".join(
    f"ld.global.nc.L1::no_allocate.v4.b32 {{${4 * i}, ${4 * i + 1}, ${4 * i + 2}, "
    f"${4 * i + 3}}}, [${16 + i}];" for i in range(4)))


@functools.lru_cache(maxsize=None)
def ptx_block(mb: int, bf16: bool, bits: int, lane_scaled: bool) -> str:
    """One slab's unpack + MMAs.  Outputs: [4 MB] D fragments, then (slab-scaled only)
    [2 MB] activation sums X (columns 2q, 2q+1).  Inputs: 8 words (4 of row r, 4 of row
    r + 8), MB activation addresses, (lane-scaled) the packed scale pairs of rows r and
    r + 8 and their bias pairs, the lane index."""
    if bits == 8 and bf16:
        raise ValueError("8-bit MMA blocks need fp16 activations")
    t16 = "bf16" if bf16 else "f16"
    magic = "0x43004300" if bf16 else "0x64006400"
    one = "0x3F803F80" if bf16 else "0x3C003C00"
    nd, nx = 4 * mb, (0 if lane_scaled else 2 * mb)
    xr = 16 if bits == 4 else 8       # activation registers per row (2 columns each)
    chunks = 8 if bits == 4 else 4    # MMAs (16 logical K) per slab
    i_w = nd + nx
    i_xa = i_w + 8
    i_s = i_xa + mb                   # lane-scaled: s_lo, s_hi, b_lo, b_hi
    i_lane = i_s + (4 if lane_scaled else 0)
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{t16}.{t16}.f32"
    accs = [f"d{i}" for i in range(nd)] + ([] if lane_scaled else [f"s{i}" for i in range(nd)])
    xs = [f"x{i}" for i in range(xr * mb)]
    body = ["{", ".reg .b32 mg, mgb, one, lid, t, a0, a1, a2, a3;",
            ".reg .b32 " + ", ".join(f"h{i}" for i in range(8)) + ";",
            ".reg .b32 " + ", ".join(xs) + ";",
            ".reg .f32 " + ", ".join(accs) + ";", ".reg .pred bad;",
            f"mov.b32 mg, {magic};", "mov.b32 mgb, 0x64646464;", f"mov.b32 one, {one};"]
    for nb in range(mb):
        for v in range(xr // 4):
            o = xr * nb + 4 * v
            body.append(f"ld.global.nc.v4.b32 {{x{o}, x{o + 1}, x{o + 2}, x{o + 3}}}, "
                        f"[${i_xa + nb} + {16 * v}];")
    body += [f"mov.f32 {a}, 0f00000000;" for a in accs]
    if bits == 4:
        body += [f"shr.u32 h{i}, ${i_w + i}, 4;" for i in range(8)]

    def pair(dst, word, sub, hi_row):
        if bits == 4:
            # byte `sub` of the word in the low half and of word >> 4 in the high half,
            # one nibble each under the magic exponent, minus the magic: exact q pairs
            sel = hex(sub | sub << 4 | (4 + sub) << 8 | (4 + sub) << 12)
            out = (f"prmt.b32 t, ${i_w + word}, h{word}, {sel}; "
                   f"lop3.b32 t, t, 0x000F000F, mg, 0xEA;")
        else:
            # bytes 2 sub, 2 sub + 1 of the word, each under 0x64: 1024 + q, minus 1024
            sel = hex(2 * sub | 4 << 4 | (2 * sub + 1) << 8 | 4 << 12)
            out = f"prmt.b32 t, ${i_w + word}, mgb, {sel};"
        if lane_scaled:  # q * s + b, rounded once
            sc, bi = (i_s + 1, i_s + 3) if hi_row else (i_s, i_s + 2)
            return out + f" sub.{t16}x2 t, t, mg; fma.rn.{t16}x2 {dst}, t, ${sc}, ${bi};"
        return out + f" sub.{t16}x2 {dst}, t, mg;"
    for t in range(chunks):
        # logical K pairs (2q, 2q+1) and (2q+8, 2q+9) of MMA t are this lane's physical
        # columns 4t + (0, 1) and 4t + (2, 3) of its run (module docstring of triton_wq_mma)
        if bits == 4:
            j, h = divmod(t, 2)
            subs = ((j, 2 * h), (j, 2 * h + 1))
        else:
            subs = ((t, 0), (t, 1))
        body += [pair("a0", subs[0][0], subs[0][1], False),
                 pair("a1", 4 + subs[0][0], subs[0][1], True),
                 pair("a2", subs[1][0], subs[1][1], False),
                 pair("a3", 4 + subs[1][0], subs[1][1], True)]
        for nb in range(mb):
            b = f"{{x{xr * nb + 2 * t}, x{xr * nb + 2 * t + 1}}}"
            d = ", ".join(f"d{4 * nb + i}" for i in range(4))
            body.append(f"{mma} {{{d}}}, {{a0, a1, a2, a3}}, {b}, {{{d}}};")
            if not lane_scaled:
                sx = ", ".join(f"s{4 * nb + i}" for i in range(4))
                body.append(f"{mma} {{{sx}}}, {{one, one, one, one}}, {b}, {{{sx}}};")
    # the fragments assume element i of the program's tensors sits in lane i % 32: poison
    # the results if Triton ever lays them out otherwise
    body += ["mov.u32 lid, %laneid;", f"setp.ne.u32 bad, lid, ${i_lane};"]
    if not lane_scaled:
        body.append("@bad mov.f32 s0, 0f7FC00000;")
    body.append("@bad mov.f32 d0, 0f7FC00000;")
    body += [f"mov.f32 ${i}, d{i};" for i in range(nd)]
    if not lane_scaled:
        body += [f"mov.f32 ${nd + 2 * nb + c}, s{4 * nb + c};"
                 for nb in range(mb) for c in range(2)]
    return "\n".join(body + ["}"])


def ptx_constraints(mb: int, lane_scaled: bool) -> str:
    """Operand constraints of ``ptx_block``: outputs, 8 words, addresses, pairs, lane."""
    outs = 4 * mb + (0 if lane_scaled else 2 * mb)
    return "=f," * outs + "r," * 8 + "l," * mb + ("r," * 4 if lane_scaled else "") + "r"


C_LOAD1 = tl.constexpr("=r," * 8 + "l,l")
C_LOAD2 = tl.constexpr("=r," * 16 + "l,l,l,l")
