"""The decoder's small per-layer ops as single calls into the CPU extension
(``csrc/cpu_layers.cpp``, ``csrc/cpu_attention.cpp``): RMSNorm, rotary embedding, SwiGLU,
KV-cache writes and paged attention over a whole batch.

Why: at batch 1 a layer of a small model spends most of its time dispatching ~40 torch ops
of 5-15 us each, and the torch reference attention loops over sequences in Python.  The
models call :func:`fits` first and keep their torch code for everything else (GPU, 16-bit
activations, no extension); each op here matches that torch code up to fp32 rounding, and
computes every row from that row alone (batch invariant).
"""
from __future__ import annotations

import torch

from quant_kernels import cpu_ext

_ops = None


def fits(x: torch.Tensor) -> bool:
    """Whether the CPU ops take this activation: fp32 on the CPU, extension loaded."""
    global _ops
    if x.dtype is not torch.float32 or x.device.type != "cpu":
        return False
    if _ops is None:
        if not cpu_ext.available():
            return False
        _ops = cpu_ext.ops()
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps))`` for x ``[T, H]``."""
    return _ops.rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x ``[T, heads, D]`` over the first ``cos.shape[-1]``
    dims; cos/sin ``[T, 1, rot]``."""
    return _ops.rope(x, cos, sin)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for x = ``[gate | up]`` ``[T, 2I]``."""
    return _ops.silu_mul(x)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    _ops.write_kv(k_cache, v_cache, k, v, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                    scale: float, sliding_window: int | None, softcap: float | None
                    ) -> torch.Tensor:
    """The paged attention of ``quantrt.models.attention`` for every sequence at once."""
    return _ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                meta.query_start_loc, scale, sliding_window or 0, softcap or 0.0)


def attention_block(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv, meta,
                    heads: int, kv_heads: int, scale: float, sliding_window: int | None,
                    softcap: float | None) -> torch.Tensor:
    """A layer's attention after its qkv projection in one call: rotary on q and k (cos/sin
    ``[T, 1, rot]``), K/V written at ``meta.slot_mapping``, paged attention.
    ``qkv [T, (heads + 2 kv_heads) * D]`` -> ``[T, heads * D]``."""
    return _ops.attention_block(qkv, rope[0], rope[1], kv[0], kv[1], meta.slot_mapping,
                                meta.block_tables, meta.context_lens, meta.query_start_loc,
                                heads, kv_heads, scale, sliding_window or 0, softcap or 0.0)
