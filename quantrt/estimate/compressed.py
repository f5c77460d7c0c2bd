"""compressed-tensors (llm-compressor) layouts: one scheme per config group, chosen by its
``targets`` unless the module is in ``ignore`` (matching as compressed-tensors does: the
module's full name, its class ``Linear``, or ``re:<regex>`` tried with ``re.match``)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from quantrt.errors import ConfigError
from quantrt.estimate.arch import Weight
from quantrt.estimate.layouts import (TRITON_AUTOTUNE_BYTES, Context, RepackedToWQ, TensorSpec,
                                     cdiv, words)

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
STRATEGIES = ("tensor", "channel", "group", "block")


@dataclass(frozen=True)
class CTScheme:
    targets: tuple[str, ...] = ("Linear",)
    num_bits: int = 4
    type: str = "int"                       # int | float
    strategy: str = "group"
    group_size: int | None = 128
    symmetric: bool = True
    actorder: str | None = None             # "group" writes weight_g_idx
    block_structure: tuple[int, int] | None = None
    format: str = "pack-quantized"
    static_input: bool = False              # static input activations: one input_scale a layer

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"compressed-tensors format {self.format!r} is not one of "
                              f"{', '.join(FORMATS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"compressed-tensors weight strategy {self.strategy!r} is not one "
                              f"of {', '.join(STRATEGIES)}")
        if self.strategy == "group" and not (isinstance(self.group_size, int)
                                             and self.group_size > 0):
            raise ConfigError(f"compressed-tensors group strategy needs a positive group_size, "
                              f"got {self.group_size!r}")
        if self.strategy == "block" and not self.block_structure:
            raise ConfigError("compressed-tensors block strategy needs block_structure")
        if not 1 <= self.num_bits <= 8:
            raise ConfigError(f"compressed-tensors num_bits must be 1..8, got {self.num_bits!r}")

    def groups(self, k: int) -> int:
        return cdiv(k, self.group_size) if self.strategy == "group" else 1

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        if self.strategy == "tensor":
            return (1,)
        if self.strategy == "block":
            return (cdiv(n, self.block_structure[0]), cdiv(k, self.block_structure[1]))
        return (n, self.groups(k))

    @property
    def label(self) -> str:
        kind = "fp" if self.type == "float" else "int"
        how = {"group": f"g{self.group_size}", "channel": "channel", "tensor": "tensor",
               "block": "block " + "x".join(map(str, self.block_structure or ()))}[self.strategy]
        return f"{kind}{self.num_bits} {how}" + ("" if self.symmetric else " asym")


def _matches(w: Weight, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], w.name) is not None
    return target == w.name or (target == "Linear" and w.is_linear)


@dataclass(frozen=True)
class CompressedTensors(RepackedToWQ):
    schemes: tuple[CTScheme, ...] = (CTScheme(),)
    ignore: tuple[str, ...] = ("lm_head", r"re:.*block_sparse_moe\.gate$")
    scale_dtype: str | None = None          # None: the checkpoint's dtype (what it writes)
    family: ClassVar[str] = "compressed-tensors"

    @property
    def min_capability(self) -> int:  # type: ignore[override]
        # vLLM: Marlin for packed ints and weight-only FP8 (8.0), CUTLASS int8 (7.5).
        return min((75 if s.format in ("int-quantized", "naive-quantized") else 80)
                   for s in self.schemes) if self.schemes else 70

    @property
    def label(self) -> str:
        return "compressed-tensors " + ", ".join(s.label for s in self.schemes)

    @property
    def kernel_workspace(self) -> int:  # type: ignore[override]
        return TRITON_AUTOTUNE_BYTES if any(s.type == "int" for s in self.schemes) else 0

    def wq_settings(self, w, k):
        s = self.scheme(w)
        if s is None or s.type != "int" or s.strategy == "block":
            return None   # FP8 stays as stored
        group = s.group_size if s.strategy == "group" else 0   # channel/tensor: one group
        return s.num_bits, group, s.actorder == "group" and 0 < group < k

    def scheme(self, w: Weight) -> CTScheme | None:
        if any(_matches(w, pattern) for pattern in self.ignore):
            return None
        return next((s for s in self.schemes if any(_matches(w, t) for t in s.targets)), None)

    def quantizes(self, w: Weight) -> bool:
        return self.scheme(w) is not None

    def quantized(self, w, n, k, full_k, ctx: Context):
        s = self.scheme(w)
        sd = self.scale_dtype or ctx.checkpoint
        scale = TensorSpec("weight_scale", s.scale_shape(n, k), sd)
        if s.format == "pack-quantized":
            out = [TensorSpec("weight_packed", (n, words(k, s.num_bits)), "int32"), scale,
                   # (N, K) as int64: read at load time to recover K, not kept.
                   TensorSpec("weight_shape", (2,), "int64", kept=False)]
            if not s.symmetric:
                out.append(TensorSpec("weight_zero_point",
                                      (words(n, s.num_bits), s.groups(k)), "int32"))
            if s.actorder == "group":
                out.append(TensorSpec("weight_g_idx", (k,), "int32"))
        else:
            dtype = "float8_e4m3fn" if s.format == "float-quantized" else "int8"
            out = [TensorSpec("weight", (n, k), dtype), scale]
            if not s.symmetric:
                out.append(TensorSpec("weight_zero_point", s.scale_shape(n, k), "int8"))
        if s.static_input:
            out.append(TensorSpec("input_scale", (1,), sd))
        return out


def _scheme_from(group: dict[str, Any], fmt: str | None, where: str) -> CTScheme:
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ConfigError("compressed-tensors config group has no 'weights' scheme", where=where)
    targets = group.get("targets") or ["Linear"]
    block = weights.get("block_structure")
    inputs = group.get("input_activations")
    fmt = group.get("format") or fmt
    if fmt is None:
        fmt = "float-quantized" if weights.get("type") == "float" else "pack-quantized"
    try:
        return CTScheme(
            targets=tuple(targets if isinstance(targets, list) else [targets]),
            num_bits=int(weights.get("num_bits", 8)), type=str(weights.get("type", "int")),
            strategy=str(weights.get("strategy") or "tensor"),
            group_size=weights.get("group_size"), symmetric=bool(weights.get("symmetric", True)),
            actorder=weights.get("actorder"), block_structure=tuple(block) if block else None,
            format=str(fmt),
            static_input=isinstance(inputs, dict) and not inputs.get("dynamic", False))
    except ConfigError as exc:
        raise ConfigError(exc.message, where=where, hint=exc.hint) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid compressed-tensors scheme: {exc}", where=where) from None


def compressed_from_config(qc: dict[str, Any], where: str) -> CompressedTensors:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError("compressed-tensors config has no config_groups", where=where)
    fmt = qc.get("format") if qc.get("format") not in (None, "mixed-precision") else None
    ignore = qc.get("ignore") or []
    return CompressedTensors(
        schemes=tuple(_scheme_from(g, fmt, where) for g in groups.values()),
        ignore=tuple(ignore if isinstance(ignore, list) else [ignore]))
