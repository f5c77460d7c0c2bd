"""A reference interpreter for the straight-line PTX recipes the kernels inline
(quant_kernels/wq_layout and g16_layout): bit operations on Python ints, f16x2/bf16x2 math
per 16-bit half in float64 and rounded once, as the hardware's fused ops round."""
from __future__ import annotations

import numpy as np
import torch


def half_value(bits16: int, kind: str = "f16") -> float:
    """The float a 16-bit pattern holds (fp16 or bf16)."""
    if kind == "f16":
        return float(np.array(bits16 & 0xFFFF, dtype=np.uint16).view(np.float16))
    return float(np.array((bits16 & 0xFFFF) << 16, dtype=np.uint32).view(np.float32))


def round16(v: float, kind: str = "f16") -> int:
    """``v`` rounded to fp16 or bf16, as a 16-bit pattern."""
    if kind == "f16":
        return int(np.array(v, dtype=np.float16).view(np.uint16))
    return int(torch.tensor(v, dtype=torch.float64).to(torch.bfloat16).view(torch.int16)) & 0xFFFF


def run_ptx(asm: str, regs: dict) -> dict:
    """Run ``asm`` (mov/shr/shl/prmt/lop3 and packed sub/fma) on the registers ``regs``."""
    def val(t):
        return int(t, 16) if t.startswith("0x") else int(t) if t.isdigit() else regs[t]
    for stmt in asm.strip("{}").replace("\n", ";").split(";"):
        if not stmt.strip() or stmt.strip().startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        d, *a = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            r = val(a[0])
        elif op == "shr.b32":
            r = val(a[0]) >> val(a[1])
        elif op == "shl.b32":
            r = val(a[0]) << val(a[1])
        elif op == "prmt.b32":  # bytes 0-3 from a, 4-7 from b; a selector nibble per byte
            src = val(a[1]) << 32 | val(a[0])
            r = sum(((src >> 8 * ((val(a[2]) >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "lop3.b32":
            assert val(a[3]) == 0xEA  # (a & b) | c
            r = (val(a[0]) & val(a[1])) | val(a[2])
        else:  # sub / fma on f16x2 or bf16x2, per 16-bit half, each rounded once
            kind = "bf16" if "bf16" in op else "f16"
            halves = [[half_value(val(t) >> sh, kind) for t in a] for sh in (0, 16)]
            if op.startswith("sub"):
                res = [h[0] - h[1] for h in halves]
            else:
                res = [h[0] * h[1] + h[2] for h in halves]  # exact in float64, then rounded
            r = round16(res[0], kind) | round16(res[1], kind) << 16
        regs[d] = r & 0xFFFFFFFF
    return regs
