"""Grouped integer weights, the common form of GPTQ, AWQ and compressed-tensors int.

Every integer algorithm (round-to-nearest, GPTQ, AWQ) produces an :class:`IntWeight`;
every integer writer packs one.  The numbers follow GPTQ's convention
(``W[n, k] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]``, unsigned codes), which
AWQ shares and compressed-tensors reaches by subtracting ``2**(bits-1)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quant_kernels.int_ref import affine_params
from quantrt.errors import ConfigError


@dataclass
class IntWeight:
    q: torch.Tensor              # int32 [K, N], codes in [0, 2**bits)
    scales: torch.Tensor         # float32 [G, N], already rounded to the stored dtype
    zeros: torch.Tensor          # int32 [G, N]
    g_idx: torch.Tensor | None   # int32 [K] (act-order), None: k // group_size
    bits: int
    group_size: int              # -1: one group

    def __post_init__(self) -> None:
        k, n = self.q.shape
        if self.scales.shape != self.zeros.shape or self.scales.shape[1] != n:
            raise ConfigError(f"IntWeight: scales {tuple(self.scales.shape)} / zeros "
                              f"{tuple(self.zeros.shape)} do not fit q {tuple(self.q.shape)}")

    def group_index(self) -> torch.Tensor:
        k = self.q.shape[0]
        if self.g_idx is not None:
            return self.g_idx.long()
        if self.group_size <= 0:
            return torch.zeros(k, dtype=torch.long)
        return torch.arange(k) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """W [N, K] float32."""
        gi = self.group_index()
        return ((self.q - self.zeros[gi]).float() * self.scales[gi]).t().contiguous()


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size <= 0 else -(-k // group_size)


def minmax_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of ``w`` [..., g] from its min/max (0 always representable).

    The scale is rounded to ``scale_dtype`` (what the checkpoint stores) before any code
    is computed, so the written weights dequantize to exactly what was optimised."""
    return affine_params(w.amin(dim=-1), w.amax(dim=-1), bits, sym, scale_dtype)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                   ) -> torch.Tensor:
    """Codes of ``w`` [..., g] with per-row ``scale``/``zero`` [...]."""
    q = torch.round(w / scale[..., None]) + zero[..., None]
    return torch.clamp(q, 0, (1 << bits) - 1)


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool,
        scale_dtype: torch.dtype = torch.float16) -> IntWeight:
    """Round-to-nearest min/max quantization of W [N, K] (partial last group allowed)."""
    n, k = w.shape
    g = k if group_size <= 0 else group_size
    w = w.float()
    pad = (-k) % g
    # A partial last group: pad with its own first column so min/max only sees real values.
    wp = torch.cat([w, w[:, k - k % g, None].expand(n, pad)], dim=1) if pad else w
    groups = wp.reshape(n, -1, g)                              # [N, G, g]
    scale, zero = minmax_params(groups, bits, sym, scale_dtype)  # [N, G]
    q = quantize_codes(groups, scale, zero, bits).reshape(n, -1)[:, :k]
    return IntWeight(q.t().to(torch.int32).contiguous(), scale.t().contiguous(),
                     zero.t().to(torch.int32).contiguous(), None, bits, group_size)
