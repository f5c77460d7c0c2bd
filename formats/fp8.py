"""FP8 (e4m3fn) weights as vLLM's ``fp8`` method and transformers' FP8 loaders read them.

* ``weight`` float8_e4m3fn ``[N, K]``.
* per tensor: ``weight_scale`` fp32 scalar / ``[1]``; after vLLM fuses q/k/v or
  gate/up it holds one scale per shard, which vLLM folds into one by requantizing every
  shard with the largest (``requantize_with_max_scale``) -- :func:`requantize_to_max_scale`.
* per channel: ``weight_scale`` ``[N, 1]`` (or ``[N]``).
* block (DeepSeek-V3 style, ``weight_block_size: [128, 128]``): ``weight_scale_inv`` fp32
  ``[ceil(N/bn), ceil(K/bk)]``; despite the name it multiplies: W = q * s[n//bn, k//bk].
  The last block row/column may be partial (e.g. K = 1376 with bk = 128): its scale
  covers only the values that exist.

W = q * s in the scale's dtype (fp32 in these checkpoints; e4m3 values are exact in any
wider float), then cast once to ``dtype``.
"""
from __future__ import annotations

import torch

from quantrt.errors import FormatError

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                         "float8_e5m2fnuz") if hasattr(torch, n))


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int],
                       block_size: tuple[int, int]) -> torch.Tensor:
    """``[ceil(N/bn), ceil(K/bk)]`` block scales -> per-element ``[N, K]``."""
    n, k = shape
    bn, bk = int(block_size[0]), int(block_size[1])
    if bn <= 0 or bk <= 0:
        raise FormatError(f"FP8 block_size {tuple(block_size)} must be positive")
    want = (-(-n // bn), -(-k // bk))
    if scale.ndim != 2 or tuple(scale.shape) != want:
        raise FormatError(f"FP8 block scale: shape {tuple(scale.shape)} but weight [{n}, {k}] in "
                          f"{bn}x{bk} blocks needs {want} (ceil, partial edge blocks included)")
    return scale.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]


def _per_row(scale: torch.Tensor, n: int, shard_sizes) -> torch.Tensor:
    """Scalar, per-shard or per-channel scale -> ``[N, 1]``."""
    flat = scale.reshape(-1)
    if flat.numel() == 1:
        return flat.reshape(1, 1).expand(n, 1)
    if shard_sizes is not None:
        sizes = [int(s) for s in shard_sizes]
        if sum(sizes) != n or len(sizes) != flat.numel():
            raise FormatError(f"FP8 weight_scale: {flat.numel()} shard scales for shard sizes "
                              f"{sizes} (sum {sum(sizes)}) of a weight with {n} rows")
        return flat.repeat_interleave(torch.tensor(sizes, device=flat.device)).reshape(n, 1)
    if flat.numel() == n and (scale.ndim == 1 or tuple(scale.shape) == (n, 1)):
        return flat.reshape(n, 1)
    raise FormatError(f"FP8 weight_scale: shape {tuple(scale.shape)} fits neither per-tensor "
                      f"([1]), per-channel ([{n}, 1]) nor per-shard (pass shard_sizes)")


def dequantize(weight: torch.Tensor, scale: torch.Tensor, *,
               block_size: tuple[int, int] | None = None, shard_sizes=None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """FP8 weight ``[N, K]`` -> W.  ``block_size`` selects block scales; otherwise the
    scale's shape decides per-tensor / per-shard / per-channel."""
    if weight.dtype not in _FP8 or weight.ndim != 2:
        raise FormatError(f"FP8 weight: expected a 2-D float8 tensor, got {weight.dtype} "
                          f"shape {tuple(weight.shape)}")
    if not scale.dtype.is_floating_point:
        raise FormatError(f"FP8 weight_scale: expected a float tensor, got {scale.dtype}")
    n, k = weight.shape
    if block_size is not None:
        s = expand_block_scale(scale, (n, k), block_size)
    else:
        s = _per_row(scale, n, shard_sizes)
    cd = scale.dtype if scale.dtype not in _FP8 else torch.float32
    return (weight.to(cd) * s.to(cd)).to(dtype or cd)


def _cast(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize(w: torch.Tensor, strategy: str = "tensor",
             block_size: tuple[int, int] = (128, 128)):
    """W ``[N, K]`` -> ``(q float8_e4m3fn [N, K], scale fp32)``: scale = amax / 448 per
    tensor (``[1]``), channel (``[N, 1]``) or block (``[ceil(N/bn), ceil(K/bk)]``, edge
    blocks sized by the values they hold); q = clamp(W / scale) rounded to nearest e4m3."""
    if w.ndim != 2:
        raise FormatError(f"FP8 quantize: expected a 2-D weight, got {tuple(w.shape)}")
    x = w.to(torch.float32)
    n, k = x.shape
    if strategy == "tensor":
        scale = (x.abs().amax().clamp(min=1e-12) / E4M3_MAX).reshape(1)
        return _cast(x / scale), scale
    if strategy == "channel":
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        return _cast(x / scale), scale
    if strategy == "block":
        bn, bk = int(block_size[0]), int(block_size[1])
        padded = torch.nn.functional.pad(x.abs(), (0, (-k) % bk, 0, (-n) % bn))
        blocks = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
        scale = blocks.amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
        return _cast(x / expand_block_scale(scale, (n, k), (bn, bk))), scale
    raise FormatError(f"FP8 quantize: unknown strategy {strategy!r} (tensor, channel, block)")


def requantize_to_max_scale(weight: torch.Tensor, scales: torch.Tensor, shard_sizes):
    """Fused shards with one scale each -> ``(weight, max_scale [1])`` sharing the largest
    scale, as vLLM's ``requantize_with_max_scale`` does (here in float32 on the CPU;
    vLLM's GPU path dequantizes in fp16 first, which can differ in the last e4m3 bit)."""
    w = dequantize(weight, scales.to(torch.float32), shard_sizes=shard_sizes,
                   dtype=torch.float32)
    max_scale = scales.to(torch.float32).max().reshape(1)
    return _cast(w / max_scale), max_scale
