"""Kernels for integer weight-only formats (GPTQ, AWQ, HQQ, compressed-tensors, bnb int8).

Each takes the shards' :class:`~quantrt.quant.packed.IntWeight` form and repacks it once.
Shards that share bits, group size and act-order permutation are concatenated along N
into one matmul (q/k/v of a GPTQ act-order checkpoint each have their own permutation,
so they stay separate pieces whose outputs are concatenated).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quant_kernels import cpu_int4
from quantrt.quant.base import fast_kernel_refusal
from quantrt.quant.packed import IntWeight, PackedKernel, ReferenceKernel


def _pieces(ints: list[IntWeight]) -> list[list[IntWeight]]:
    """Consecutive shards that can run as one matmul."""
    out: list[list[IntWeight]] = []
    for w in ints:
        last = out[-1][-1] if out else None
        if last is not None and last.bits == w.bits and last.group_size == w.group_size \
                and last.has_act_order() == w.has_act_order() \
                and (not w.has_act_order() or torch.equal(last.g_idx, w.g_idx)):
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _merged(piece: list[IntWeight]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor | None, int, int]:
    """(q [N, K], scales [N, G] fp32, zeros [N, G] fp32, perm or None, group, bits) of a
    piece, columns in stored order: with act-order, ``x[:, perm] @ W_stored.T``."""
    from quant_kernels.wq_layout import perm_from_g_idx

    first = piece[0]
    q = torch.cat([w.q for w in piece], dim=1).t()
    scales = torch.cat([w.scales for w in piece], dim=1).t().float()
    zeros = torch.cat([w.zeros for w in piece], dim=1).t().float()
    perm = None
    if first.has_act_order():
        perm = perm_from_g_idx(first.g_idx, first.group_size)
        q = q[:, perm.long()]
    return q.contiguous(), scales, zeros, perm, first.group_size, first.bits


def _act_order_ok(ints: list[IntWeight]) -> tuple[bool, str]:
    from quant_kernels.wq_layout import perm_from_g_idx

    for w in ints:
        if w.has_act_order():
            try:
                perm_from_g_idx(w.g_idx, w.group_size)
            except ValueError as exc:
                return False, f"act-order g_idx cannot be regrouped: {exc}"
    return True, ""


class _PieceKernel(PackedKernel):
    """Runs each piece and concatenates the outputs."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self._run(x, self.parts[0])
        return torch.cat([self._run(x, p) for p in self.parts], dim=-1)


def _decode_kernel(parts, device) -> str:
    """Which kernels serve M <= 16, or why the Gluon one is refused."""
    from quant_kernels import gluon_wq_rs

    whys = {gluon_wq_rs.weight_refusal(w, device) for w in parts} - {""}
    if whys:
        return ("Triton decode kernels (Gluon register-operand decode GEMM refused: "
                + "; ".join(sorted(whys)) + ")")
    return ("Triton decode kernels, from M = 9 timed against the Gluon register-operand "
            "decode GEMM")


def _mid_m_kernel(parts, device) -> str:
    """Which GEMM serves M > 16 besides the Triton ones, or why the Gluon one is refused."""
    from quant_kernels import gluon_wq_gemm, gluon_wq_rs

    whys = {gluon_wq_gemm.weight_refusal(w, device) for w in parts} - {""}
    if whys:
        return ("Triton GEMMs (Gluon warp-specialized GEMM refused: " + "; ".join(sorted(whys))
                + ")")
    rs_whys = {gluon_wq_rs.weight_refusal(w, device) for w in parts} - {""}
    if rs_whys:
        return ("timed against the Gluon warp-specialized GEMM (register-operand GEMM "
                "refused: " + "; ".join(sorted(rs_whys)) + ")")
    return "timed against the Gluon GEMMs (warp-specialized, and register-operand)"


class TritonWQKernel(_PieceKernel):
    """Fused Triton dequant-matmul (GEMV / split-K for decode, tiled GEMM for prefill)."""

    name = "triton-wq (fused dequant-matmul)"

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        from quant_kernels import triton_wq
        from quant_kernels.wq_layout import GROUP_SIZES

        why = fast_kernel_refusal(policy, device, "cuda")
        if why:
            return False, why
        if not triton_wq.HAS_TRITON:
            return False, "triton is not installed"
        if layer.params_dtype not in (torch.float16, torch.bfloat16):
            return False, f"needs float16/bfloat16 activations, not {layer.params_dtype}"
        ints = method.shard_ints(layer)
        if ints is None:
            return False, "the format is not integer-affine"
        for w in ints:
            if w.bits > 8:
                return False, f"{w.bits}-bit values"
            if w.group_size not in GROUP_SIZES and w.group_size != w.k:
                return False, f"group size {w.group_size} (kernel tiles take {GROUP_SIZES} or K)"
        return _act_order_ok(ints)

    def __init__(self, method, layer, device) -> None:
        from quant_kernels.triton_wq import pack_wq

        self.parts = []
        for piece in _pieces(method.shard_ints(layer)):
            q, s, z, perm, group, bits = _merged(piece)
            # 2/3-bit widen to 4, 5-7-bit to 8: the kernels read 4- and 8-bit words.
            wbits = 4 if bits <= 4 else 8
            self.parts.append(pack_wq(q.to(device), s.to(device), (-z * s).to(device),
                                      group, wbits, perm, dtype=layer.params_dtype))
        self.choice_name = (f"{self.name}; M <= 16: {_decode_kernel(self.parts, device)}; "
                            f"M > 16: {_mid_m_kernel(self.parts, device)}")

    def _run(self, x, w):
        from quant_kernels.triton_wq import wq_matmul

        return wq_matmul(x, w)

    def tensors(self):
        return [t for w in self.parts for t in (w.qweight, w.scales, w.bias, w.perm)
                if t is not None]


class CpuTinygemmKernel(_PieceKernel):
    """torch's CPU int4 "tinygemm" op (bf16 activations), for up to 4-bit formats."""

    name = "cpu-int4pack (tinygemm, bf16 activations)"

    @staticmethod
    def _group(group_size: int) -> int | None:
        """A tinygemm group dividing ``group_size``: scales repeat within the larger group."""
        for g in sorted(cpu_int4.TINYGEMM_GROUPS, reverse=True):
            if group_size % g == 0:
                return g
        return None

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        why = fast_kernel_refusal(policy, device, "cpu")
        if why:
            return False, why
        ints = method.shard_ints(layer)
        if ints is None:
            return False, "the format is not integer-affine"
        for w in ints:
            if w.bits > 4:
                return False, f"{w.bits}-bit values (tinygemm takes up to 4 bits)"
            if cls._group(w.group_size) is None and w.group_size != w.k:
                return False, (f"group size {w.group_size} is not a multiple of one of "
                               f"{cpu_int4.TINYGEMM_GROUPS}")
        ok, why = cpu_int4.supports_affine(16, 32, 32)
        if not ok:
            return False, why
        return _act_order_ok(ints)

    def __init__(self, method, layer, device) -> None:
        self.parts = []
        for piece in _pieces(method.shard_ints(layer)):
            q, s, z, perm, group, _ = _merged(piece)
            k = q.shape[1]
            tg = self._group(group) or 32
            # Per-channel or K not a multiple of the tile group: pad K; the padded
            # activation columns are zero, so the padded weights never count.
            kp = -(-k // tg) * tg
            gi = torch.arange(kp) // group
            gi = gi.clamp(max=s.shape[1] - 1)[::tg]
            qp = F.pad(q, (0, kp - k))
            qp, zt = self._center(qp.view(q.shape[0], -1, tg), z[:, gi])
            self.parts.append((cpu_int4.prepare_affine(qp, s[:, gi], zt, tg), perm, kp - k))

    @staticmethod
    def _center(q: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift q [N, tiles, tg] and its zeros z [N, tiles] by the same integer so that the
        zero lands near 8: tinygemm computes (q - 8) * s + (8 - z) * s with a bf16 second
        term, whose rounding cancels badly when z is far from 8 (low-bit and asymmetric
        formats).  Shifts keep q within 0..15, so nothing changes mathematically."""
        lo, hi = q.amin(-1), q.amax(-1)
        shift = torch.minimum(torch.maximum(torch.round(8 - z), -lo.float()), 15 - hi.float())
        shift = shift.to(torch.int64)
        q = q.to(torch.int64) + shift.unsqueeze(-1)
        return q.reshape(q.shape[0], -1), z + shift.float()

    def _run(self, x, part):
        w, perm, pad = part
        if perm is not None:
            x = x.index_select(-1, perm.long())
        if pad:
            x = F.pad(x, (0, pad))
        return cpu_int4.matmul(x, w)

    def tensors(self):
        return [t for w, perm, _ in self.parts for t in (*w.packed, *w.scales_zeros, perm)
                if t is not None]


INT_KERNELS: tuple[type[PackedKernel], ...] = (TritonWQKernel, CpuTinygemmKernel, ReferenceKernel)

