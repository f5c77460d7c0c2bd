"""Generic torch references for integer-grouped and lookup-table weight formats.

These are the CPU fallback path and the test oracle for every "unpacked" layout that
the format modules produce: GPTQ, AWQ, HQQ and compressed-tensors all reduce to
``W[n, k] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]``, and bitsandbytes NF4/FP4 to
``W.flat[i] = code[idx[i]] * absmax[i // blocksize]``.

Bit-exactness with the reference libraries depends on where rounding happens:

* integer zeros: ``(q - z)`` is an integer of at most 9 bits and every scale dtype in
  use has at most 24 significant bits, so the float32 product is exact and one cast to
  the output dtype gives the same bits as the references' fp16/bf16 multiply;
* float zeros (HQQ): the subtraction itself rounds, so HQQ's result is only reproduced
  when ``compute_dtype`` is the dtype HQQ computes in (its ``compute_dtype``, fp16 by
  default).
"""
from __future__ import annotations

import torch

from quantrt.errors import FormatError


def _group_index(k: int, n_groups: int, g_idx, group_size, device) -> torch.Tensor:
    if g_idx is not None:
        if tuple(g_idx.shape) != (k,):
            raise FormatError(f"g_idx: shape {tuple(g_idx.shape)} but q has K={k} rows")
        return g_idx.to(device=device, dtype=torch.long)
    if group_size not in (None, -1, 0):
        return torch.arange(k, device=device) // group_size
    if n_groups == 1:
        return torch.zeros(k, dtype=torch.long, device=device)
    raise FormatError(f"{n_groups} groups of scales but neither g_idx nor group_size given")


def dequant_int(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                g_idx: torch.Tensor | None = None, *, group_size: int | None = None,
                dtype: torch.dtype = torch.float32,
                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q`` int ``[K, N]``, ``scales``/``zeros`` ``[G, N]`` -> W ``[N, K]`` in ``dtype``.

    ``zeros``: integer (stored zero points), float (HQQ-style, subtracted in
    ``compute_dtype``), or None when ``q`` is already centred (signed values).
    Row ``k`` uses group ``g_idx[k]``, else ``k // group_size``, else group 0.
    """
    if q.ndim != 2 or scales.ndim != 2:
        raise FormatError(f"dequant_int: q {tuple(q.shape)} and scales {tuple(scales.shape)} "
                          "must be 2-D")
    k, n = q.shape
    if scales.shape[1] != n:
        raise FormatError(f"dequant_int: scales {tuple(scales.shape)} has {scales.shape[1]} "
                          f"columns but q has N={n}")
    if zeros is not None and zeros.shape != scales.shape:
        raise FormatError(f"dequant_int: zeros {tuple(zeros.shape)} must match scales "
                          f"{tuple(scales.shape)}")
    gi = _group_index(k, scales.shape[0], g_idx, group_size, q.device)
    if k and int(gi.max()) >= scales.shape[0]:
        raise FormatError(f"dequant_int: group index {int(gi.max())} but only "
                          f"{scales.shape[0]} groups of scales")
    s = scales.to(compute_dtype)[gi]
    if zeros is None:
        d = q.to(compute_dtype)
    elif zeros.dtype.is_floating_point:
        d = q.to(compute_dtype) - zeros.to(compute_dtype)[gi]
    else:
        d = (q.to(torch.int32) - zeros.to(torch.int32)[gi]).to(compute_dtype)
    return (d * s).t().contiguous().to(dtype)


def linear_int_ref(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, *, group_size: int | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in float32 with W from :func:`dequant_int`."""
    w = dequant_int(q, scales, zeros, g_idx, group_size=group_size,
                    compute_dtype=compute_dtype, dtype=torch.float32)
    out = x.to(torch.float32) @ w.t()
    return out + bias.to(torch.float32) if bias is not None else out


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True,
                 g_idx: torch.Tensor | None = None):
    """Round-to-nearest min/max quantizer for tests and conversion.

    ``w`` float ``[N, K]`` -> ``(q int32 [K, N], scales fp32 [G, N], zeros int32 [G, N])``
    with unsigned codes in ``[0, 2**bits)``; symmetric uses the zero ``2**(bits-1)``.
    Rows are grouped by ``g_idx`` when given (act-order), else ``k // group_size``.
    """
    n, k = w.shape
    gi = _group_index(k, 1, g_idx, group_size if group_size > 0 else None, w.device)
    n_groups = int(gi.max()) + 1 if k else 1
    wt = w.t().to(torch.float32)  # [K, N]
    inf = torch.full((n_groups, n), float("inf"), device=w.device)
    lo = inf.scatter_reduce(0, gi[:, None].expand(k, n), wt, "amin")
    hi = (-inf).scatter_reduce(0, gi[:, None].expand(k, n), wt, "amax")
    scales, zeros = affine_params(lo, hi, bits, sym)
    q = torch.clamp(torch.round(wt / scales[gi]) + zeros[gi], 0, (1 << bits) - 1)
    return q.to(torch.int32), scales, zeros.to(torch.int32)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool,
                  scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero of ranges ``[lo, hi]`` (widened to include 0), as floats.

    The scale is rounded to ``scale_dtype`` (what a checkpoint stores) before the zero is
    derived from it, so codes computed with both dequantize to what is stored."""
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    maxq = (1 << bits) - 1
    if sym:
        amax = torch.maximum(-lo, hi)
        scale = torch.where(amax > 0, 2 * amax / maxq, torch.ones_like(amax))
    else:
        scale = torch.where(hi > lo, (hi - lo) / maxq, torch.ones_like(hi))
    scale = scale.to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # fp16 underflow
    if sym:
        return scale, torch.full_like(scale, float(1 << (bits - 1)))
    return scale, torch.clamp(torch.round(-lo / scale), 0, maxq)


def dequant_lut(idx: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Code-book dequant (bitsandbytes NF4/FP4): ``code[idx[i]] * absmax[i // blocksize]``.

    ``idx`` holds one code index per value in flat (row-major) order, at least
    ``prod(shape)`` of them; the product is taken in float32 and cast once, as
    bitsandbytes' CPU kernels do.  A partial last block uses its own absmax entry.
    """
    n = 1
    for d in shape:
        n *= int(d)
    flat = idx.reshape(-1)
    if flat.numel() < n:
        raise FormatError(f"dequant_lut: {flat.numel()} codes for shape {tuple(shape)} "
                          f"({n} values)")
    n_blocks = -(-n // blocksize)
    if absmax.numel() != n_blocks:
        raise FormatError(f"dequant_lut: absmax has {absmax.numel()} entries but {n} values in "
                          f"blocks of {blocksize} need {n_blocks}")
    vals = code.to(torch.float32)[flat[:n].to(torch.long)]
    blk = torch.arange(n, device=idx.device) // blocksize
    return (vals * absmax.reshape(-1).to(torch.float32)[blk]).reshape(shape).to(dtype)


def linear_lut_ref(x: torch.Tensor, idx: torch.Tensor, code: torch.Tensor,
                   absmax: torch.Tensor, blocksize: int, shape: tuple[int, int],
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in float32 with W ``[N, K]`` from :func:`dequant_lut`."""
    w = dequant_lut(idx, code, absmax, blocksize, shape, torch.float32)
    out = x.to(torch.float32) @ w.t()
    return out + bias.to(torch.float32) if bias is not None else out
