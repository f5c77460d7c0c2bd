"""Building blocks shared by every model: quantization-agnostic linear and embedding
layers, RMSNorm, rotary embeddings (default, linear, llama3, yarn, longrope) and the
gated-MLP activations.

``QuantLinear`` and ``VocabEmbedding`` hold no format logic: their quantization method
(chosen by the checkpoint's :class:`~quantrt.quant.base.QuantConfig`) creates, loads,
repacks and applies the weights.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant_kernels import cpu_layers, fused_ops
from quantrt.config import RopeConfig
from quantrt.errors import FormatError
from quantrt.quant.base import QuantConfig, ShardTracker


class QuantLinear(nn.Module):
    """A linear layer whose output may fuse several checkpoint tensors ("shards"),
    e.g. q/k/v -> qkv_proj.  ``output_sizes`` lists each shard's rows."""

    def __init__(self, input_size: int, output_sizes: list[int], *, bias: bool,
                 quant_config: QuantConfig, prefix: str, params_dtype: torch.dtype,
                 shard_names: list[str] | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(output_sizes)
        self.prefix = prefix
        # The checkpoint's (unfused) module names, which skip lists refer to.
        head = prefix.rpartition(".")[0]
        self.shard_prefixes = ([f"{head}.{n}" if head else n for n in shard_names]
                               if shard_names else [prefix])
        if len(self.shard_prefixes) != len(self.output_sizes):
            raise ValueError(f"{prefix}: {len(self.output_sizes)} shards but names "
                             f"{self.shard_prefixes}")
        self.tracker = ShardTracker()
        self.method = quant_config.get_quant_method(self, prefix)
        self.method.create_weights(self, input_size, self.output_sizes, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size, dtype=params_dtype),
                                     requires_grad=False)
            self.tracker.expected |= {("bias", s) for s in range(len(output_sizes))}
        else:
            self.register_parameter("bias", None)
        # tensor parallelism (set by shard_tp): zero-pad the input, all-reduce the output
        # (row-parallel), keep only some output rows (a widened column cut)
        self.tp_pad: tuple[int, int] | None = None
        self.tp_group: Any = None
        self.tp_keep: torch.Tensor | None = None

    def shard_tp(self, cut: Any, group: Any = None) -> None:
        """Cut the loaded full-size weights to one rank's part (a ColumnCut of the output
        rows, or a RowCut of the input columns whose partial sums ``group`` all-reduces)."""
        from quantrt.parallel.plan import ColumnCut

        if isinstance(cut, ColumnCut):
            rows = [list(shard) for shard in cut.stored]
            if rows != [[(0, n)] for n in self.output_sizes]:
                self.method.shard(self, rows, None)
            if self.bias is not None:
                data = self.bias.data
                parts = [data[self.shard_offset(i) + a:self.shard_offset(i) + b]
                         for i, shard in enumerate(rows) for a, b in shard]
                self.bias = nn.Parameter(torch.cat(parts), requires_grad=False)
            self.output_sizes = cut.sizes()
            self.output_size = sum(self.output_sizes)
            keep = cut.keep
            self.tp_keep = None if keep is None else torch.tensor(keep, dtype=torch.int64)
        else:
            if cut.stored != (0, self.input_size):   # else kept whole, fed padded inputs
                self.method.shard(self, None, cut.stored)
            self.input_size = cut.stored[1] - cut.stored[0]
            self.tp_pad = cut.pad
            self.tp_group = group

    def shard_offset(self, shard: int) -> int:
        return sum(self.output_sizes[:shard])

    def load(self, name: str, tensor: Any, shard: int = 0) -> None:
        if name == "bias" and self.bias is not None:
            rows = self.output_sizes[shard]
            t = torch.as_tensor(tensor)
            if tuple(t.shape) != (rows,):
                raise FormatError(f"tensor {self.prefix}.bias (shard {shard}) has shape "
                                  f"{tuple(t.shape)}, expected ({rows},)")
            off = self.shard_offset(shard)
            self.bias.data[off:off + rows].copy_(t)
            self.tracker.mark("bias", shard)
            return
        self.method.load_weight(self, name, tensor, shard)

    def process_weights_after_loading(self, device: torch.device) -> None:
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.data.to(device), requires_grad=False)
        if self.tp_keep is not None:
            self.tp_keep = self.tp_keep.to(device)
        self.method.process_weights_after_loading(self, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None and self.tp_pad is None and self.tp_keep is None:
            return self.method.apply(self, x, self.bias)
        if self.tp_pad is not None:
            x = F.pad(x, self.tp_pad)
        if self.tp_group is None:
            y = self.method.apply(self, x, self.bias)
        else:  # partial sums of a row-parallel layer; the bias is added once, after
            y = self.tp_group.all_reduce(self.method.apply(self, x, None).contiguous())
            if self.bias is not None:
                y = y + self.bias
        return y if self.tp_keep is None else y.index_select(-1, self.tp_keep)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_sizes}, method={self.method.describe(self)}"


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *, quant_config: QuantConfig,
                 prefix: str, params_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.params_dtype = params_dtype
        self.tracker = ShardTracker()
        self.method = quant_config.get_quant_method(self, prefix)
        self.method.create_weights(self, num_embeddings, embedding_dim, params_dtype)

        self.tp_range: tuple[int, int] | None = None     # vocabulary rows this rank holds
        self.tp_group: Any = None

    def load(self, name: str, tensor: Any, shard: int = 0) -> None:
        self.method.load_weight(self, name, tensor)

    def shard_tp(self, start: int, end: int, group: Any) -> None:
        self.method.shard_rows(self, start, end)
        self.tp_range = (start, end)
        self.tp_group = group

    def process_weights_after_loading(self, device: torch.device) -> None:
        self.method.process_weights_after_loading(self, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_range is None:
            return self.method.embed(self, ids, self.params_dtype)
        # vocab-parallel: each rank looks up the ids it holds, zeros elsewhere, summed
        start, end = self.tp_range
        inside = (ids >= start) & (ids < end)
        h = self.method.embed(self, torch.where(inside, ids - start, 0), self.params_dtype)
        h = h.masked_fill(~inside.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(h.contiguous())


class RMSNorm(nn.Module):
    """RMSNorm; ``offset`` is added to the checkpoint's weight on load (Gemma's HF checkpoints
    store ``multiplier - 1``).  ``fp32``: keep the weight in fp32 and scale before casting back
    to the activation dtype, as Gemma does (Llama casts first, then scales)."""

    def __init__(self, size: int, eps: float, params_dtype: torch.dtype, prefix: str = "", *,
                 offset: float = 0.0, fp32: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.prefix = prefix
        self.offset = offset
        self.fp32 = fp32
        dtype = torch.float32 if fp32 else params_dtype
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)
        self.tracker = ShardTracker(expected={("weight", 0)})

    def load(self, name: str, tensor: Any, shard: int = 0) -> None:
        t = torch.as_tensor(tensor)
        if name != "weight" or tuple(t.shape) != tuple(self.weight.shape):
            raise FormatError(f"tensor {self.prefix}.{name} has shape {tuple(t.shape)}, "
                              f"expected {tuple(self.weight.shape)}")
        # the offset is added in fp32: 1 + w must not round in a 16-bit checkpoint dtype
        self.weight.data.copy_(t.float() + self.offset if self.offset else t)
        self.tracker.mark("weight", 0)

    def process_weights_after_loading(self, device: torch.device) -> None:
        self.weight = nn.Parameter(self.weight.data.to(device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32:
            return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(x.dtype)
        if x.dim() == 2 and cpu_layers.fits(x):
            return cpu_layers.rms_norm(x, self.weight, self.eps)
        # One fused op; it normalises in fp32 internally like HF's LlamaRMSNorm.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(rope: RopeConfig, rot_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (and the factor cos/sin are scaled by: yarn, longrope)."""
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
    inv = 1.0 / (rope.theta ** exponents)
    scale = 1.0
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wl = rope.original_max_position / rope.low_freq_factor
        high_wl = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * inv / rope.factor + smooth * inv
        inv = torch.where(wavelen > low_wl, inv / rope.factor,
                          torch.where(wavelen < high_wl, inv, blended))
    elif rope.rope_type == "yarn":
        def dim_for(rot: float) -> float:
            return (rot_dim * math.log(rope.original_max_position / (rot * 2 * math.pi))) / (
                2 * math.log(rope.theta))
        low = max(math.floor(dim_for(rope.beta_fast)), 0)
        high = min(math.ceil(dim_for(rope.beta_slow)), rot_dim - 1)
        ramp = (torch.arange(rot_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
        extrapolate = 1 - ramp.clamp(0, 1)
        inv = inv / rope.factor * (1 - extrapolate) + inv * extrapolate
        scale = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
    elif rope.rope_type == "longrope":
        # the short factors; RotaryEmbedding builds the long table itself
        inv = 1.0 / (torch.tensor(rope.short_factor) * rope.theta ** exponents)
        scale = rope.attention_factor if rope.attention_factor is not None else 1.0
    elif rope.rope_type == "dynamic":
        pass  # NTK-dynamic only changes frequencies beyond the trained context; applied per length
    return inv, scale


class RotaryEmbedding(nn.Module):
    """Rotate-half (NeoX) rotary embedding over the first ``rot_dim`` dims of each head.

    cos/sin tables are precomputed for every position; ``tables(positions)`` is looked up
    once per forward and shared by all layers that use this rotary.

    longrope (Phi-3) has a second table from its long factors.  As transformers does, a
    step uses the long one for every token of a sequence whose context after the step
    exceeds the original length (so a cached key keeps the rotation it was written with;
    llama.cpp instead picks one table for the whole run from the context size)."""

    def __init__(self, rope: RopeConfig, head_dim: int, rot_dim: int, max_positions: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rot_dim = rot_dim
        self.rope = rope
        self.max_positions = max_positions
        self._build(None)

    def _table(self, inv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(self.max_positions, dtype=torch.float32)
        emb = torch.cat((torch.outer(t, inv),) * 2, dim=-1)
        return emb.cos() * scale, emb.sin() * scale

    def _build(self, freq_factors: torch.Tensor | None) -> None:
        inv, scale = rope_inv_freq(self.rope, self.rot_dim)
        if freq_factors is not None:
            inv = inv / freq_factors.float().to(inv.device)
        cos, sin = self._table(inv, scale)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if self.rope.rope_type == "longrope":
            exponents = torch.arange(0, self.rot_dim, 2, dtype=torch.int64).float() / self.rot_dim
            long_inv = 1.0 / (torch.tensor(self.rope.long_factor) * self.rope.theta ** exponents)
            cos, sin = self._table(long_inv, scale)
            self.register_buffer("cos_long", cos, persistent=False)
            self.register_buffer("sin_long", sin, persistent=False)

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        """Per-frequency divisors, as Llama 3.1+ GGUFs store their rope scaling
        (``rope_freqs.weight``, one value per rotated pair) instead of config keys."""
        if tuple(factors.shape) != (self.rot_dim // 2,):
            raise FormatError(f"rope_freqs.weight has shape {tuple(factors.shape)}, expected "
                              f"({self.rot_dim // 2},)")
        device = self.cos.device
        self._build(factors)
        self.to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype,
               meta: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin as [T, 1, rot_dim] in ``dtype``."""
        cos, sin = self.cos[positions], self.sin[positions]
        if self.rope.rope_type == "longrope":
            long = (self._context_ends(positions, meta) > self.rope.original_max_position)[:, None]
            cos = torch.where(long, self.cos_long[positions], cos)
            sin = torch.where(long, self.sin_long[positions], sin)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if dtype != cos.dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    @staticmethod
    def _context_ends(positions: torch.Tensor, meta: Any) -> torch.Tensor:
        """Per token: its sequence's length after this step.  A decode-only step (the one
        CUDA graphs capture) needs no host data: each row is its own sequence."""
        if meta is None or meta.max_query_len <= 1:
            return positions + 1
        counts = torch.tensor(meta.query_lens_host, device=positions.device)
        return torch.repeat_interleave(meta.context_lens.to(positions.device, torch.int64),
                                       counts, output_size=positions.shape[0])

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] (any number of heads: q and k can go together)."""
        if cpu_layers.fits(x) and x.dim() == 3 and cos.dtype == x.dtype:
            return cpu_layers.rope(x, cos, sin)
        rot = self.rot_dim
        xr = x[..., :rot] if rot != x.shape[-1] else x
        half = rot // 2
        rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
        out = xr * cos + rotated * sin
        if rot == x.shape[-1]:
            return out
        return torch.cat((out, x[..., rot:]), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and cpu_layers.fits(x):
        return cpu_layers.silu_mul(x)
    if x.dim() == 2 and x.stride(1) == 1 and fused_ops.usable(x):
        return fused_ops.silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """Gated MLP activation over ``[gate | up]``: SwiGLU (silu) or GeGLU (gelu / gelu_tanh)."""
    if act == "silu":
        return silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none") * up
