"""AWQ checkpoints (AutoAWQ), 4-bit with zero points, in both on-disk layouts:
``version: gemm`` (packed along N, interleaved) and ``version: gemv`` (packed along K,
padded zeros/scales), which vLLM cannot load.  ``awq_marlin`` names the same format."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from formats import awq as awq_format
from quantrt.errors import ConfigError, UnsupportedError
from quantrt.quant.base import (EmbeddingMethod, LinearMethod, QuantConfig, check_bool,
                                check_int, config_get, is_quantized)
from quantrt.quant.packed import IntWeight, PackedLinearMethod, TensorSpec
from quantrt.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("gemm", "gemv")
# AutoAWQ versions whose checkpoints we have not verified to share one of LAYOUTS.
OTHER_VERSIONS = ("gemv_fast", "marlin", "exllama", "ipex")


@dataclass(frozen=True)
class AWQParams:
    group_size: int
    version: str

    def __post_init__(self) -> None:
        check_int(self.group_size, "group_size")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"quantization setting 'group_size' = {self.group_size} must be "
                              "positive or -1")
        if self.version not in LAYOUTS:
            raise ConfigError(f"unknown AWQ version {self.version!r}", hint="expected gemm or gemv")


class AWQLinearMethod(PackedLinearMethod):
    def __init__(self, params: AWQParams, policy: str) -> None:
        super().__init__(policy)
        self.p = params
        group = "per-channel" if params.group_size == -1 else f"g{params.group_size}"
        self.label = f"awq {params.version} 4-bit {group}"

    def _group(self, cols: int) -> tuple[int, int]:
        g = cols if self.p.group_size == -1 else self.p.group_size
        return g, -(-cols // g)

    def specs(self, rows: int, cols: int) -> dict[str, TensorSpec]:
        g, n_groups = self._group(cols)
        if self.p.version == "gemm":
            if rows % 8:
                raise UnsupportedError(f"AWQ GEMM packs 8 output columns per int32, but this "
                                       f"layer has N={rows}")
            return {
                "qweight": TensorSpec((cols, rows // 8), (torch.int32,),
                                      why=f"K={cols} x N={rows}/8 words (GEMM layout)"),
                "qzeros": TensorSpec((n_groups, rows // 8), (torch.int32,),
                                     why=f"ceil(K={cols}/{g}) groups x N={rows}/8 words"),
                "scales": TensorSpec((n_groups, rows), FLOATS,
                                     why=f"ceil(K={cols}/{g}) groups x N={rows}"),
            }
        width = awq_format.calculate_zeros_width(cols, self.p.group_size)
        return {
            "qweight": TensorSpec((rows, -(-cols // 8)), (torch.int32,),
                                  why=f"N={rows} x K={cols}/8 words (GEMV layout)"),
            "qzeros": TensorSpec((rows, width), (torch.int32,),
                                 why=f"N={rows} x AutoAWQ's zeros width {width}"),
            "scales": TensorSpec((rows, 8 * width), FLOATS, why=f"N={rows} x 8 * {width}"),
        }

    def _unpack(self, t: dict[str, torch.Tensor], cols: int):
        return awq_format.unpack(t["qweight"], t["qzeros"], t["scales"], 4, self.p.group_size,
                                 self.p.version, in_features=cols)

    def reference(self, t, rows, cols, where):
        return awq_format.dequantize(t["qweight"], t["qzeros"], t["scales"], 4, self.p.group_size,
                                     self.p.version, in_features=cols, dtype=torch.float32)

    def to_int(self, t, rows, cols, where):
        q, z, s = self._unpack(t, cols)
        return IntWeight(q, s, z, None, self._group(cols)[0], 4)


class AWQConfig(QuantConfig):
    name = "awq"
    aliases = ("awq-marlin",)

    def __init__(self, params: AWQParams, skip: tuple[str, ...] = (), policy: str = "auto") -> None:
        self.params = params
        self.skip = skip
        self.policy = policy

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AWQConfig":
        bits = config_get(config, "bits", "w_bit", default=4)
        check_int(bits, "bits")
        if bits != 4:
            raise UnsupportedError(f"AWQ with {bits}-bit weights: AutoAWQ only writes 4-bit",
                                   hint="check the checkpoint's quantization_config")
        if not check_bool(config_get(config, "zero_point", default=True), "zero_point"):
            raise UnsupportedError("AWQ without zero points (zero_point: false) is not supported",
                                   hint="AutoAWQ's kernels also require zero_point: true")
        version = config_get(config, "version", default="gemm")
        if not isinstance(version, str):
            raise ConfigError(f"AWQ 'version' must be a string, got {version!r}")
        version = version.lower()
        if version in OTHER_VERSIONS:
            raise UnsupportedError(f"AWQ version {version!r} checkpoints are not supported yet",
                                   hint="export with version gemm or gemv")
        skip = config_get(config, "modules_to_not_convert", default=[])
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise ConfigError("'modules_to_not_convert' must be a list of module names")
        group = config_get(config, "group_size", "q_group_size", default=128)
        return cls(AWQParams(group, version), tuple(skip))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | EmbeddingMethod:
        from quantrt.models.layers import VocabEmbedding

        if isinstance(layer, VocabEmbedding):
            return UnquantizedEmbeddingMethod()
        # AutoAWQ never quantizes lm_head; modules_to_not_convert matches by substring.
        if prefix == "lm_head" or not is_quantized(
                layer, lambda n: not any(s in n for s in self.skip)):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(self.params, self.policy)

    def settings(self) -> dict[str, Any]:
        return {"version": self.params.version, "bits": 4, "group_size": self.params.group_size,
                "zero_point": True, "modules_to_not_convert": list(self.skip)}
