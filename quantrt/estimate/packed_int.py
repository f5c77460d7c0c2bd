"""Packed-integer layouts: GPTQ (v1/v2), Marlin's pre-tiled format, AWQ (GEMM/GEMV).

K = in_features, N = out_features, g = group size, G = ceil(K/g) (1 for g = -1); the
int32 word counts are those of formats/gptq.py, formats/marlin.py and formats/awq.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from quantrt.errors import ConfigError
from quantrt.estimate.arch import Weight
from quantrt.estimate.layouts import RepackedToWQ, TensorSpec, cdiv, words


def awq_gemv_zeros_width(k: int, group_size: int) -> int:
    """Words per output row of AWQ GEMV qzeros (formats.awq.calculate_zeros_width): the
    groups' nibbles rounded up to 1, 2 or 4 words for g >= 128, 64, 32."""
    g = k if group_size <= 0 else group_size
    mult = 1 if group_size <= 0 or g >= 128 else {64: 2, 32: 4}.get(g)
    if mult is None:
        raise ConfigError(f"AWQ GEMV has no zeros layout for group_size {group_size}",
                          hint="AutoAWQ supports 32, 64 and >= 128")
    return cdiv(cdiv(cdiv(k, g), 8), mult) * mult


@dataclass(frozen=True)
class GPTQ(RepackedToWQ):
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    lm_head: bool = False
    # AutoGPTQ gives every quantized linear an fp16 bias (zeros where the model has none;
    # vLLM skips those on load); GPTQModel and optimum write biases only where they exist.
    zero_bias: bool = False
    # GPTQModel's per-module rules: (regex, overrides) in order; overrides None = not quantized.
    dynamic: tuple[tuple[str, tuple[tuple[str, Any], ...] | None], ...] = ()
    family: ClassVar[str] = "gptq"
    min_capability: ClassVar[int] = 60

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"GPTQ bits must be 2, 3, 4 or 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise ConfigError(f"GPTQ group_size must be positive or -1, got {self.group_size!r}")

    @property
    def label(self) -> str:
        g = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"GPTQ {self.bits}-bit {g}" + (" act-order" if self.desc_act else "")

    def rule(self, name: str) -> "GPTQ | None":
        for pattern, override in self.dynamic:
            if re.match(pattern, name):
                return None if override is None else replace(self, **dict(override), dynamic=())
        return self

    def wq_settings(self, w, k):
        cfg = self.rule(w.name) or self
        # With a single group (K <= group) act-order's g_idx is all zeros: nothing to permute.
        return cfg.bits, cfg.group_size, cfg.desc_act and 0 < cfg.group_size < k

    def quantizes(self, w: Weight) -> bool:
        if w.role == "router":
            return False  # GPTQModel's module lists leave the MoE router out
        if w.role == "lm_head":
            return self.lm_head
        return self.rule(w.name) is not None

    def quantized(self, w, n, k, full_k, ctx):
        cfg = self.rule(w.name) or self
        # Act-order on a row-parallel layer: every GPU keeps all groups' scales (vLLM).
        scale_k = full_k if cfg.desc_act and cfg.group_size > 0 else k
        groups = 1 if cfg.group_size <= 0 else cdiv(scale_k, cfg.group_size)
        out = [TensorSpec("qweight", (words(k, cfg.bits), n), "int32"),
               TensorSpec("qzeros", (groups, words(n, cfg.bits)), "int32"),
               TensorSpec("scales", (groups, n), "float16"),
               TensorSpec("g_idx", (k,), "int32")]
        if self.zero_bias and not w.bias:
            out.append(TensorSpec("bias", (n,), "float16", kept=False))
        return out


@dataclass(frozen=True)
class Marlin(RepackedToWQ):
    """4-bit symmetric weights pre-tiled for the Marlin kernel (vLLM ``quant_method: marlin``,
    AutoGPTQ ``checkpoint_format: marlin``): ``B`` int32 [K/16, 2N] (16 x 16 tiles of
    nibbles), ``s`` fp16 [G, N]; no zeros, no g_idx."""

    group_size: int = 128
    lm_head: bool = False
    family: ClassVar[str] = "marlin"
    min_capability: ClassVar[int] = 80

    def __post_init__(self) -> None:
        if self.group_size not in (-1, 128):
            raise ConfigError(f"Marlin group_size must be 128 or -1, got {self.group_size!r}")

    @property
    def label(self) -> str:
        return f"Marlin 4-bit {'channel' if self.group_size == -1 else f'g{self.group_size}'}"

    def wq_settings(self, w, k):
        return 4, self.group_size, False

    def quantizes(self, w: Weight) -> bool:
        return w.role != "router" and (w.role != "lm_head" or self.lm_head)

    def quantized(self, w, n, k, full_k, ctx):
        groups = 1 if self.group_size == -1 else cdiv(k, self.group_size)
        return [TensorSpec("B", (cdiv(k, 16), 2 * n), "int32"),
                TensorSpec("s", (groups, n), "float16")]


@dataclass(frozen=True)
class AWQ(RepackedToWQ):
    group_size: int = 128
    version: str = "gemm"
    zero_point: bool = True
    modules_to_not_convert: tuple[str, ...] = ()
    family: ClassVar[str] = "awq"
    min_capability: ClassVar[int] = 75

    def __post_init__(self) -> None:
        if self.version not in ("gemm", "gemv"):
            raise ConfigError(f"AWQ version must be gemm or gemv, got {self.version!r}")
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise ConfigError(f"AWQ group_size must be positive or -1, got {self.group_size!r}")

    @property
    def label(self) -> str:
        return f"AWQ 4-bit g{self.group_size} {self.version}"

    def wq_settings(self, w, k):
        return 4, self.group_size, False

    def quantizes(self, w: Weight) -> bool:
        # transformers tests the skip list with a plain substring ("gate" skips Mixtral's router).
        return w.role not in ("router", "lm_head") and not any(
            key in w.name for key in self.modules_to_not_convert)

    def quantized(self, w, n, k, full_k, ctx):
        g = k if self.group_size <= 0 else self.group_size
        if self.version == "gemm":
            groups = cdiv(k, g)
            return [TensorSpec("qweight", (k, cdiv(n, 8)), "int32"),
                    TensorSpec("qzeros", (groups, cdiv(n, 8)), "int32"),
                    TensorSpec("scales", (groups, n), "float16")]
        width = awq_gemv_zeros_width(k, self.group_size)
        return [TensorSpec("qweight", (n, cdiv(k, 8)), "int32"),
                TensorSpec("qzeros", (n, width), "int32"),
                TensorSpec("scales", (n, 8 * width), "float16")]
