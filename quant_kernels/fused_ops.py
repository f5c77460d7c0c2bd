"""Fused elementwise ops of a decoder layer on the GPU (one launch where torch needs several).

A decode step of an 8B model runs ~250 small kernels besides its GEMVs; replayed from a CUDA
graph each still costs a few microseconds, about as much as the int4 GEMVs together.  These
kernels merge the common chains:

* ``rope_write_kv``: rotate-half (NeoX) rotary of q and k from the fused qkv output, the
  rotated k and the v written to their paged-cache slots, q returned: one launch instead of
  the ~7 of ``RotaryEmbedding.apply`` + ``write_kv``;
* ``silu_mul``: ``silu(gate) * up`` over ``[gate | up]`` (2 launches in torch);
* ``add_rms_norm``: ``h = h + delta`` then ``RMSNorm(h)`` (Llama casts to the activation
  dtype before scaling), both outputs in one pass.

Math is fp32, rounded once to the output dtype (torch's composite rotary rounds after each
product in bf16/fp16, so results differ in the last bit).  Each wrapper checks shapes and
dtypes and raises ValueError; callers use ``usable`` to decide.  Under ``TRITON_INTERPRET=1``
the same kernels run on CPU tensors (tests).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - hosts without Triton keep the torch ops
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(x: torch.Tensor) -> bool:
    """Whether the model takes the fused kernels for tensors like ``x``: CUDA tensors, not
    turned off by QUANTRT_FUSED_OPS=0.  (The CPU keeps its own fused C++ ops; the tests
    call these functions on CPU tensors under the interpreter.)"""
    return (HAS_TRITON and x.is_cuda and not INTERPRET
            and os.environ.get("QUANTRT_FUSED_OPS", "1") != "0")


if HAS_TRITON:
    @triton.jit
    def _rope_kv_kernel(
        # qkv [T, (HQ + 2 HK) * D], cos/sin [T, ROT], q out [T, HQ, D],
        # caches [slots, HK, D] (flat view of [blocks, block_size, HK, D]), slots [T]
        qkv_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
        stride_t, stride_cos, stride_qt, stride_qh, stride_cs, stride_ch,
        HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)  # one q or k head; k programs also move their v head
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        row = qkv_ptr + t.to(tl.int64) * stride_t
        x = tl.load(row + h * D + d, mask=dmask, other=0.0).to(tl.float32)
        # rotate-half over the first ROT dims: out[i] = x[i] cos[i] -/+ x[i +- ROT/2] sin[i]
        HALF: tl.constexpr = ROT // 2
        rot = d < ROT
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        xp = tl.load(row + h * D + partner, mask=dmask & rot, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + t * stride_cos + d, mask=rot, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_cos + d, mask=rot, other=0.0).to(tl.float32)
        out = x * c + tl.where(d < HALF, -xp, xp) * s
        if h < HQ:
            tl.store(q_ptr + t * stride_qt + h * stride_qh + d,
                     out.to(q_ptr.dtype.element_ty), mask=dmask)
        else:
            kh = h - HQ
            slot = tl.load(slot_ptr + t).to(tl.int64)
            dst = slot * stride_cs + kh * stride_ch + d
            tl.store(kc_ptr + dst, out.to(kc_ptr.dtype.element_ty), mask=dmask)
            v = tl.load(row + (HQ + HK + kh) * D + d, mask=dmask, other=0.0)
            tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        row = x_ptr + t.to(tl.int64) * stride_x
        g = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(row + N + offs, mask=mask, other=0.0).to(tl.float32)
        # silu in fp32 rounded to the dtype, then the product rounded: as torch computes
        # F.silu(gate) * up
        a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * stride_o + offs,
                 (a * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, hout_ptr, nout_ptr, stride_h, stride_d,
                             stride_ho, stride_no, N, eps, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        h = tl.load(h_ptr + t * stride_h + offs, mask=mask, other=0.0)
        dl = tl.load(d_ptr + t * stride_d + offs, mask=mask, other=0.0)
        # the residual sum is rounded to the dtype, as torch's h + delta is
        hs = (h.to(tl.float32) + dl.to(tl.float32)).to(hout_ptr.dtype.element_ty)
        tl.store(hout_ptr + t * stride_ho + offs, hs, mask=mask)
        hf = hs.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        normed = (hf * rstd).to(nout_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(nout_ptr + t * stride_no + offs, normed.to(nout_ptr.dtype.element_ty),
                 mask=mask)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """q [T, num_heads, head_dim] rotated; rotated k and v written to the cache slots.

    ``qkv`` [T, (num_heads + 2 num_kv_heads) * head_dim] (rows contiguous), ``cos``/``sin``
    [T, 1, rot_dim] as ``RotaryEmbedding.tables`` gives them, caches
    [blocks, block_size, num_kv_heads, head_dim] contiguous, of qkv's dtype.
    """
    t = qkv.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    _check(qkv.dim() == 2 and qkv.shape[1] == width and qkv.stride(1) == 1,
           f"qkv must be [T, {width}] with contiguous rows, got {tuple(qkv.shape)}")
    rot = cos.shape[-1]
    _check(cos.shape == sin.shape and cos.numel() == t * rot and rot % 2 == 0
           and rot <= head_dim, f"cos/sin must be [T, 1, rot_dim <= {head_dim}], got "
           f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous()
           and k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim),
           f"caches must be contiguous [blocks, block_size, {num_kv_heads}, {head_dim}]")
    _check(k_cache.dtype == qkv.dtype, "the fused path writes caches of qkv's dtype only")
    _check(slot_mapping.shape == (t,), f"slot_mapping must be [T={t}]")
    q = torch.empty(t, num_heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    if t == 0:
        return q
    cos2, sin2 = cos.reshape(t, rot), sin.reshape(t, rot)
    _check(cos2.stride(1) == 1 and sin2.stride() == cos2.stride(),
           "cos/sin rows must be contiguous and alike")
    _rope_kv_kernel[(t, num_heads + num_kv_heads)](
        qkv, cos2, sin2, q, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos2.stride(0), q.stride(0), q.stride(1),
        num_kv_heads * head_dim, head_dim,
        HQ=num_heads, HK=num_kv_heads, D=head_dim, ROT=rot,
        BLOCK_D=triton.next_power_of_2(head_dim))
    return q


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :n]) * x[:, n:]`` for ``x`` [T, 2n]."""
    _check(x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1,
           f"x must be [T, 2n] with contiguous rows, got {tuple(x.shape)}")
    t, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(t, n, device=x.device, dtype=x.dtype)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(t, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n,
                                                     BLOCK=block)
    return out


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + delta, RMSNorm(h + delta))`` for [T, N] activations, one pass."""
    _check(h.dim() == 2 and h.shape == delta.shape and h.dtype == delta.dtype
           and h.stride(1) == 1 and delta.stride(1) == 1,
           f"h and delta must be alike [T, N] with contiguous rows, got {tuple(h.shape)} "
           f"and {tuple(delta.shape)}")
    _check(weight.shape == (h.shape[1],), f"weight must be [{h.shape[1]}]")
    t, n = h.shape
    _check(n <= 65536, f"rows of {n} values are more than one program takes")
    hout, nout = torch.empty_like(h), torch.empty_like(h)
    if t:
        _add_rms_norm_kernel[(t,)](h, delta, weight, hout, nout, h.stride(0), delta.stride(0),
                                   hout.stride(0), nout.stride(0), n, eps,
                                   BLOCK=triton.next_power_of_2(n))
    return hout, nout
