"""PTX of ``triton_wq_mma`` (the M <= 16 tensor-core decode kernel): 16-byte weight loads
and the per-slab unpack + ``mma.sync`` blocks, as strings for ``tl.inline_asm_elementwise``.
The fragment layout they assume is described in ``triton_wq_mma``'s docstring.

Two ways of applying the scale groups:

* slab-scaled (groups of a multiple of 128, or per-channel): the A fragments are the exact
  integers ``q`` (one packed subtract of the magic number); the block returns the slab's
  sums ``D = sum q * x`` and ``X = sum x`` (one more MMA with an all-ones A), and the
  kernel adds ``s * D + b * X`` in fp32.
* lane-scaled (groups of 32 or 64, e.g. GGUF Q4_0/Q4_1, HQQ): a lane's 32 columns of a slab
  lie in one group, but one MMA sums the columns of four lanes, i.e. of up to four groups,
  so the scale cannot be applied to the sums.  The A fragments are the dequantized weights
  instead, ``fma.rn.{f16,bf16}x2(q, s, b)`` with the lane's own scale and bias (one rounding
  to the activation dtype, as the other kernels of the common layout round), and the
  block returns ``D = sum w * x`` only.
"""
from __future__ import annotations

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


def _ptx_compute(mb: int, bf16: bool) -> str:
    """Outputs: [4 MB] D fragments, then [2 MB] activation sums X (columns 2q, 2q+1).
    Inputs: 8 words, MB activation addresses (64 bytes each), the lane index."""
    t16 = "bf16" if bf16 else "f16"
    magic = "0x43004300" if bf16 else "0x64006400"
    one = "0x3F803F80" if bf16 else "0x3C003C00"
    nd, nx = 4 * mb, 2 * mb
    i_w = nd + nx
    i_xa = i_w + 8
    i_lane = i_xa + mb
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{t16}.{t16}.f32"
    accs = [f"d{i}" for i in range(nd)] + [f"s{i}" for i in range(4 * mb)]
    xs = [f"x{i}" for i in range(16 * mb)]
    body = ["{", ".reg .b32 mg, one, lid, t, a0, a1, a2, a3;",
            ".reg .b32 " + ", ".join(f"h{i}" for i in range(8)) + ";",
            ".reg .b32 " + ", ".join(xs) + ";",
            ".reg .f32 " + ", ".join(accs) + ";", ".reg .pred bad;",
            f"mov.b32 mg, {magic};", f"mov.b32 one, {one};"]
    for nb in range(mb):
        for v in range(4):
            o = 16 * nb + 4 * v
            body.append(f"ld.global.nc.v4.b32 {{x{o}, x{o + 1}, x{o + 2}, x{o + 3}}}, "
                        f"[${i_xa + nb} + {16 * v}];")
    body += [f"mov.f32 {a}, 0f00000000;" for a in accs]
    body += [f"shr.u32 h{i}, ${i_w + i}, 4;" for i in range(8)]

    def pair(dst, word, byte):
        # byte `byte` of the word in the low half and of word >> 4 in the high half,
        # one nibble each under the magic exponent, minus the magic: exact q pairs
        sel = hex(byte | byte << 4 | (4 + byte) << 8 | (4 + byte) << 12)
        return (f"prmt.b32 t, ${i_w + word}, h{word}, {sel}; "
                f"lop3.b32 t, t, 0x000F000F, mg, 0xEA; sub.{t16}x2 {dst}, t, mg;")
    for t in range(8):
        j, h = divmod(t, 2)
        body += [pair("a0", j, 2 * h), pair("a1", 4 + j, 2 * h),
                 pair("a2", j, 2 * h + 1), pair("a3", 4 + j, 2 * h + 1)]
        for nb in range(mb):
            b = f"{{x{16 * nb + 2 * t}, x{16 * nb + 2 * t + 1}}}"
            d = ", ".join(f"d{4 * nb + i}" for i in range(4))
            sx = ", ".join(f"s{4 * nb + i}" for i in range(4))
            body.append(f"{mma} {{{d}}}, {{a0, a1, a2, a3}}, {b}, {{{d}}};")
            body.append(f"{mma} {{{sx}}}, {{one, one, one, one}}, {b}, {{{sx}}};")
    # the fragments assume element i of the program's tensors sits in lane i % 32: poison
    # the results if Triton ever lays them out otherwise
    body += ["mov.u32 lid, %laneid;", f"setp.ne.u32 bad, lid, ${i_lane};",
             "@bad mov.f32 s0, 0f7FC00000;", "@bad mov.f32 d0, 0f7FC00000;"]
    body += [f"mov.f32 ${i}, d{i};" for i in range(nd)]
    body += [f"mov.f32 ${nd + 2 * nb + c}, s{4 * nb + c};" for nb in range(mb) for c in range(2)]
    return "\n".join(body + ["}"])


ASM_F16_1 = tl.constexpr(_ptx_compute(1, False))
ASM_F16_2 = tl.constexpr(_ptx_compute(2, False))
ASM_BF16_1 = tl.constexpr(_ptx_compute(1, True))
ASM_BF16_2 = tl.constexpr(_ptx_compute(2, True))
# constraints: D and X outputs, 8 words, activation addresses, lane
C_LOAD1 = tl.constexpr("=r," * 8 + "l,l")
C_LOAD2 = tl.constexpr("=r," * 16 + "l,l,l,l")
C1 = tl.constexpr("=f," * 6 + "r," * 8 + "l,r")
C2 = tl.constexpr("=f," * 12 + "r," * 8 + "l,l,r")


def _ptx_compute_lane_scaled(mb: int, bf16: bool) -> str:
    """Outputs: [4 MB] D fragments.  Inputs: 8 words, MB activation addresses (64 bytes
    each), the packed scale pairs of rows r and r + 8, their bias pairs, the lane index."""
    t16 = "bf16" if bf16 else "f16"
    magic = "0x43004300" if bf16 else "0x64006400"
    nd = 4 * mb
    i_w = nd
    i_xa = i_w + 8
    i_s = i_xa + mb          # s_lo, s_hi, b_lo, b_hi
    i_lane = i_s + 4
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{t16}.{t16}.f32"
    accs = [f"d{i}" for i in range(nd)]
    xs = [f"x{i}" for i in range(16 * mb)]
    body = ["{", ".reg .b32 mg, lid, t, a0, a1, a2, a3;",
            ".reg .b32 " + ", ".join(f"h{i}" for i in range(8)) + ";",
            ".reg .b32 " + ", ".join(xs) + ";",
            ".reg .f32 " + ", ".join(accs) + ";", ".reg .pred bad;",
            f"mov.b32 mg, {magic};"]
    for nb in range(mb):
        for v in range(4):
            o = 16 * nb + 4 * v
            body.append(f"ld.global.nc.v4.b32 {{x{o}, x{o + 1}, x{o + 2}, x{o + 3}}}, "
                        f"[${i_xa + nb} + {16 * v}];")
    body += [f"mov.f32 {a}, 0f00000000;" for a in accs]
    body += [f"shr.u32 h{i}, ${i_w + i}, 4;" for i in range(8)]

    def pair(dst, word, byte, hi_row):
        # the exact q pair as in the slab-scaled block, then q * s + b rounded once
        sel = hex(byte | byte << 4 | (4 + byte) << 8 | (4 + byte) << 12)
        sc, bi = (i_s + 1, i_s + 3) if hi_row else (i_s, i_s + 2)
        return (f"prmt.b32 t, ${i_w + word}, h{word}, {sel}; "
                f"lop3.b32 t, t, 0x000F000F, mg, 0xEA; sub.{t16}x2 t, t, mg; "
                f"fma.rn.{t16}x2 {dst}, t, ${sc}, ${bi};")
    for t in range(8):
        j, h = divmod(t, 2)
        body += [pair("a0", j, 2 * h, False), pair("a1", 4 + j, 2 * h, True),
                 pair("a2", j, 2 * h + 1, False), pair("a3", 4 + j, 2 * h + 1, True)]
        for nb in range(mb):
            b = f"{{x{16 * nb + 2 * t}, x{16 * nb + 2 * t + 1}}}"
            d = ", ".join(f"d{4 * nb + i}" for i in range(4))
            body.append(f"{mma} {{{d}}}, {{a0, a1, a2, a3}}, {b}, {{{d}}};")
    body += ["mov.u32 lid, %laneid;", f"setp.ne.u32 bad, lid, ${i_lane};",
             "@bad mov.f32 d0, 0f7FC00000;"]
    body += [f"mov.f32 ${i}, d{i};" for i in range(nd)]
    return "\n".join(body + ["}"])


LANE_F16_1 = tl.constexpr(_ptx_compute_lane_scaled(1, False))
LANE_F16_2 = tl.constexpr(_ptx_compute_lane_scaled(2, False))
LANE_BF16_1 = tl.constexpr(_ptx_compute_lane_scaled(1, True))
LANE_BF16_2 = tl.constexpr(_ptx_compute_lane_scaled(2, True))
# constraints: D outputs, 8 words, activation addresses, 4 packed scale/bias pairs, lane
LANE_C1 = tl.constexpr("=f," * 4 + "r," * 8 + "l," + "r," * 4 + "r")
LANE_C2 = tl.constexpr("=f," * 8 + "r," * 8 + "l,l," + "r," * 4 + "r")
