"""Linear methods whose checkpoint stores several tensors per layer (qweight, scales, ...).

A subclass describes its format and nothing else:

* ``specs(rows, cols)``: the on-disk tensors of one output shard, with exact shapes/dtypes;
* ``reference(tensors, rows, cols)``: the format's own torch dequantization (the oracle);
* ``to_int(tensors, rows, cols)``: optionally, the shard as an :class:`IntWeight`
  (``w = (q - zero) * scale`` per group), which every integer kernel can take.

Loading keeps each shard's tensors exactly as stored.  ``process_weights_after_loading``
walks the method's kernel priority list (``can_implement -> (ok, reason)``), builds the
first kernel that accepts the layer, and drops the on-disk tensors unless that kernel
still reads them.  Refusals are kept for ``inspect``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.errors import FormatError, UnsupportedError
from quantrt.parallel.plan import lcm
from quantrt.parallel.slicing import row_ranges_to_index, take
from quantrt.quant.base import KernelChoice, LinearMethod


@dataclass(frozen=True)
class TensorSpec:
    """One on-disk tensor of a shard.  ``dtypes=None`` accepts any floating dtype."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...] | None = None
    required: bool = True
    why: str = ""               # how the shape follows from the layer, for error messages
    # Tensor parallelism: (axis, elements per index) along the output rows (N) and the
    # input columns (K); None: the tensor does not vary along that dimension (kept whole).
    n: tuple[int, int] | None = None
    k: tuple[int, int] | None = None


@dataclass(frozen=True)
class IntWeight:
    """``W[n, k] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n]`` with ``g(k) = g_idx[k]``
    (or ``k // group_size``).  q is unsigned in ``[0, 2**bits)``; zeros may be float (HQQ)."""

    q: torch.Tensor             # int [K, N]
    scales: torch.Tensor        # float [G, N]
    zeros: torch.Tensor         # int or float [G, N]
    g_idx: torch.Tensor | None  # int [K] or None (= k // group_size)
    group_size: int             # columns per group; K when there is one group
    bits: int

    @property
    def k(self) -> int:
        return self.q.shape[0]

    def has_act_order(self) -> bool:
        if self.g_idx is None:
            return False
        plain = torch.arange(self.k, device=self.g_idx.device) // self.group_size
        return not torch.equal(self.g_idx.to(plain.dtype), plain)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K]: the canonical form's own oracle (tests compare it with the format's)."""
        from quant_kernels.int_ref import dequant_int

        return dequant_int(self.q, self.scales, self.zeros, self.g_idx,
                           group_size=self.group_size, dtype=dtype)


class PackedKernel(ABC):
    """A way to run one layer.  Built once per layer after loading."""

    name: ClassVar[str]
    keeps_raw: ClassVar[bool] = False   # the on-disk tensors stay alive (reference path)

    @classmethod
    @abstractmethod
    def can_implement(cls, method: "PackedLinearMethod", layer: nn.Module,
                      device: torch.device, policy: str) -> tuple[bool, str]: ...

    @abstractmethod
    def __init__(self, method: "PackedLinearMethod", layer: nn.Module,
                 device: torch.device) -> None: ...

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x.dtype."""

    def tensors(self) -> list[torch.Tensor]:
        return []


class ReferenceKernel(PackedKernel):
    """Dequantize every shard with the format's own reference on each call, then GEMM.
    Exact and always available; the test oracle and the last entry of every list."""

    name = "dequantize + F.linear (torch reference)"
    keeps_raw = True

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        return True, ""

    def __init__(self, method, layer, device) -> None:
        self.method = method
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.raw_shards is None:  # a tensor-parallel cut kept only the integer form
            w = torch.cat([iw.dequantize() for iw in layer.tp_ints])
        else:
            w = torch.cat([self.method.reference(raw, rows, layer.input_size, f"{layer.prefix}")
                           for raw, rows in zip(layer.raw_shards, layer.output_sizes)])
        return F.linear(x, w.to(device=x.device, dtype=x.dtype))


class PackedLinearMethod(LinearMethod):
    """Shared loading logic for multi-tensor formats; see the module docstring."""

    label: ClassVar[str] = "packed"

    def __init__(self, policy: str = "auto") -> None:
        self.policy = policy

    # -- the format ---------------------------------------------------------------------
    @abstractmethod
    def specs(self, rows: int, cols: int) -> dict[str, TensorSpec]:
        """The tensors of one output shard of ``rows`` x ``cols`` (N x K)."""

    @abstractmethod
    def reference(self, tensors: dict[str, torch.Tensor], rows: int, cols: int,
                  where: str) -> torch.Tensor:
        """float32 W [rows, cols] from the stored tensors (the format's own math)."""

    def to_int(self, tensors: dict[str, torch.Tensor], rows: int, cols: int,
               where: str) -> IntWeight | None:
        """The shard as an :class:`IntWeight`, or None if the format is not integer-affine."""
        return None

    def kernels(self) -> tuple[type[PackedKernel], ...]:
        """Priority list, fastest first; the last must accept every layer."""
        from quantrt.quant.int_kernels import INT_KERNELS

        return INT_KERNELS

    # -- LinearMethod -------------------------------------------------------------------
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        layer.raw_shards = [{} for _ in output_sizes]
        layer.params_dtype = params_dtype
        for s, rows in enumerate(output_sizes):
            specs = self.specs(rows, input_size)
            layer.tracker.expected |= {(n, s) for n, sp in specs.items() if sp.required}

    def load_weight(self, layer: nn.Module, name: str, tensor: Any, shard: int) -> None:
        rows = layer.output_sizes[shard]
        specs = self.specs(rows, layer.input_size)
        where = f"{layer.prefix}.{name}" + (f" (shard {shard})" if len(layer.output_sizes) > 1 else "")
        spec = specs.get(name)
        if spec is None:
            raise FormatError(f"unexpected tensor {where} for a {self.label} layer",
                              hint=f"a {self.label} layer holds {', '.join(specs)}; check the "
                                   f"checkpoint's quantization settings")
        if not isinstance(tensor, torch.Tensor):
            raise FormatError(f"tensor {where} has an unexpected type {type(tensor).__name__}")
        if tuple(tensor.shape) != spec.shape:
            why = f" ({spec.why})" if spec.why else ""
            raise FormatError(f"tensor {where} has shape {tuple(tensor.shape)}, expected "
                              f"{spec.shape}{why}",
                              hint="the quantization settings (bits, group size) do not "
                                   "match the stored tensors")
        ok = (tensor.dtype.is_floating_point if spec.dtypes is None
              else tensor.dtype in spec.dtypes)
        if not ok:
            want = "a float dtype" if spec.dtypes is None else " or ".join(
                str(d).removeprefix("torch.") for d in spec.dtypes)
            raise FormatError(f"tensor {where} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                              f"expected {want}")
        layer.raw_shards[shard][name] = tensor
        layer.tracker.mark(name, shard)

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        refused: list[tuple[str, str]] = []
        for kernel_cls in self.kernels():
            ok, why = kernel_cls.can_implement(self, layer, device, self.policy)
            if ok:
                break
            refused.append((kernel_cls.name, why))
        else:  # pragma: no cover - the reference kernel accepts everything
            raise UnsupportedError(f"no kernel for {layer.prefix}")
        if kernel_cls.keeps_raw and layer.raw_shards is None:
            layer.tp_ints = [_int_to(w, device) for w in layer.tp_ints]
        elif kernel_cls.keeps_raw:
            layer.raw_shards = [{n: t.to(device) for n, t in raw.items()}
                                for raw in layer.raw_shards]
        layer.packed_kernel = kernel_cls(self, layer, device)
        layer._int_shards = None
        layer.format_label = self.describe(layer)
        if not kernel_cls.keeps_raw:  # the kernel holds its own repacked copy
            layer.raw_shards = layer.tp_ints = None
        kept = ([t for raw in layer.raw_shards for t in raw.values()] if layer.raw_shards
                else [t for w in (getattr(layer, "tp_ints", None) or ())
                      for t in (w.q, w.scales, w.zeros, w.g_idx) if t is not None])
        layer.kernel_tensors = kept + layer.packed_kernel.tensors()
        # a kernel may name its own inner choice (e.g. which GEMM serves prefill)
        name = getattr(layer.packed_kernel, "choice_name", kernel_cls.name)
        layer.kernel_choice = KernelChoice(name, tuple(refused))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = layer.packed_kernel(x2)
        if bias is not None:
            y = y + bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    # -- tensor parallelism -------------------------------------------------------------
    def tp_cuts_ints(self, layer: nn.Module) -> bool:
        """Cut the integer form (one code path for every integer format) rather than the
        stored tensors; formats whose fast kernels read the stored tensors say no."""
        return self.shard_ints(layer) is not None

    def tp_units(self, layer: nn.Module) -> tuple[int, int]:
        if self.tp_cuts_ints(layer):
            # whole groups per rank; act-order keeps every group's scales on every rank
            return 1, lcm(*(1 if w.has_act_order() or w.group_size >= w.k else w.group_size
                            for w in self.shard_ints(layer)))
        n_units, k_units = [], []
        for raw, rows in zip(layer.raw_shards, layer.output_sizes):
            for name, spec in self.specs(rows, layer.input_size).items():
                if name in raw:
                    n_units.append(spec.n[1] if spec.n else 1)
                    k_units.append(spec.k[1] if spec.k else 1)
        return lcm(*n_units), lcm(*k_units)

    def shard(self, layer: nn.Module, rows, cols) -> None:
        if self.tp_cuts_ints(layer):
            layer.tp_ints = [_cut_int(w, rows[i] if rows else None, cols)
                             for i, w in enumerate(self.shard_ints(layer))]
            layer._int_shards = layer.tp_ints
            layer.raw_shards = None
            return
        out = []
        for i, (raw, n) in enumerate(zip(layer.raw_shards, layer.output_sizes)):
            specs = self.specs(n, layer.input_size)
            cut = {}
            for name, t in raw.items():
                spec = specs.get(name)
                if rows is not None and spec is not None and spec.n is not None:
                    t = take(t, spec.n[0], rows[i], spec.n[1])
                if cols is not None and spec is not None and spec.k is not None:
                    t = take(t, spec.k[0], [cols], spec.k[1])
                cut[name] = t
            out.append(cut)
        layer.raw_shards = out

    def shard_ints(self, layer: nn.Module) -> list[IntWeight] | None:
        """Every shard as an IntWeight (cached on the layer while loading), or None."""
        cached = getattr(layer, "_int_shards", None)
        if cached is not None or layer.raw_shards is None:
            return cached
        ints = [self.to_int(raw, rows, layer.input_size, layer.prefix)
                for raw, rows in zip(layer.raw_shards, layer.output_sizes)]
        if any(i is None for i in ints):
            return None
        layer._int_shards = ints
        return ints

    def describe(self, layer: nn.Module) -> str:
        return getattr(layer, "format_label", None) or self.label


def _int_to(w: IntWeight, device: torch.device) -> IntWeight:
    return IntWeight(w.q.to(device), w.scales.to(device), w.zeros.to(device),
                     None if w.g_idx is None else w.g_idx.to(device), w.group_size, w.bits)


def _cut_int(w: IntWeight, rows: list[tuple[int, int]] | None,
             cols: tuple[int, int] | None) -> IntWeight:
    """Output columns ``rows`` or input rows ``cols`` of an IntWeight (q is [K, N]).  A K cut
    starts on a group boundary unless the weight is act-order, whose g_idx keeps pointing
    into the full (uncut) scales."""
    q, scales, zeros, g_idx = w.q, w.scales, w.zeros, w.g_idx
    if rows is not None:
        idx = row_ranges_to_index(rows, q.device)
        q, scales, zeros = q[:, idx], scales[:, idx], zeros[:, idx]
    if cols is not None:
        k0, k1 = cols
        if w.has_act_order():
            g_idx = g_idx[k0:k1]
        else:
            if w.group_size < w.k:
                g0, g1 = k0 // w.group_size, -(-k1 // w.group_size)
                scales, zeros = scales[g0:g1], zeros[g0:g1]
            g_idx = None
        q = q[k0:k1]
    group = w.group_size if (w.group_size < w.k or w.has_act_order()) else q.shape[0]
    return IntWeight(q.contiguous(), scales.contiguous(), zeros.contiguous(), g_idx, group,
                     w.bits)
