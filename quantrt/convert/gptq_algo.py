"""GPTQ (Frantar et al., arXiv:2210.17323): quantize W [N, K] one input column at a time,
spreading each column's rounding error over the columns not yet quantized through the
inverse Hessian of the layer's inputs (H = 2/n X^T X), so that ||XW^T - XQ^T|| stays small.

* damping: ``damp * mean(diag(H))`` added to the diagonal (dead inputs get 1 and a zero
  weight) keeps the Cholesky factorisation stable;
* act-order: columns in order of decreasing diag(H) (the most salient first, while the
  most error can still be compensated); groups are formed in that order, and ``g_idx``
  maps every original column to its group -- the GPTQ v1 ``desc_act`` layout;
* lazy batch updates: the error is applied inside blocks of 128 columns and propagated to
  the rest once per block (same result, far fewer memory passes).
Group scales/zeros are taken from the error-updated weights when a group starts, and
rounded to the stored scale dtype first, so the checkpoint holds exactly what was used.
"""
from __future__ import annotations

import torch

from quantrt.convert.intq import IntWeight, minmax_params, quantize_codes, num_groups

BLOCK = 128


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (rows give the error-propagation coefficients)."""
    k = h.shape[0]
    step = damp * torch.mean(torch.diag(h))
    for attempt in range(6):
        try:
            l = torch.linalg.cholesky(h + step * (10 ** attempt) * torch.eye(k, dtype=h.dtype))
            hinv = torch.cholesky_inverse(l)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch._C._LinAlgError:  # not positive definite: damp harder
            continue
    raise RuntimeError("GPTQ: the Hessian stays singular even with 1e5x damping")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool,
                  act_order: bool = False, damp: float = 0.01,
                  scale_dtype: torch.dtype = torch.float16) -> IntWeight:
    """W [N, K] and H [K, K] -> the GPTQ :class:`IntWeight` (codes in original order)."""
    w = w.clone().float()
    h = h.clone().double()  # float64: the Cholesky of a 1k-8k Hessian needs the range
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp).float()
    g = k if group_size <= 0 else group_size
    n_groups = num_groups(k, group_size)
    scales = torch.ones(n_groups, n)
    zeros = torch.zeros(n_groups, n)
    q = torch.zeros(n, k)
    scale = zero = None
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                # The group's params from its current (error-compensated) weights.
                grp = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :min(g, k - col)]
                scale, zero = minmax_params(grp, bits, sym, scale_dtype)
                scales[col // g], zeros[col // g] = scale, zero
            qc = quantize_codes(w1[:, i:i + 1], scale, zero, bits)[:, 0]
            q[:, col] = qc
            deq = (qc - zero) * scale
            e = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    q = q[:, inv]
    g_idx = (inv // g).to(torch.int32) if act_order else None
    return IntWeight(q.t().to(torch.int32).contiguous(), scales, zeros.to(torch.int32),
                     g_idx, bits, group_size)
