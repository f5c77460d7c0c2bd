"""Checkpoints stored in Marlin's pre-tiled layout: vLLM's ``quant_method: marlin`` and
AutoGPTQ's ``quant_method: gptq`` with ``checkpoint_format: marlin`` (detect.py maps the latter
here).  The tiles are undone once at load (formats/marlin.py) and the weight runs on the same
integer kernels as GPTQ; shapes Marlin itself would refuse still load."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from formats import marlin as marlin_format
from quantrt.errors import ConfigError, FormatError
from quantrt.quant.base import (EmbeddingMethod, LinearMethod, QuantConfig, check_bool,
                                check_int, config_get)
from quantrt.quant.packed import IntWeight, PackedLinearMethod, TensorSpec
from quantrt.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod


class MarlinLinearMethod(PackedLinearMethod):
    def __init__(self, group_size: int, policy: str) -> None:
        super().__init__(policy)
        self.group_size = group_size
        self.label = f"marlin 4-bit {'per-channel' if group_size == -1 else f'g{group_size}'} sym"

    def specs(self, rows: int, cols: int) -> dict[str, TensorSpec]:
        try:
            marlin_format.check_shape(cols, rows, self.group_size)
        except FormatError as exc:
            raise FormatError(exc.message, hint="this layer cannot be stored in Marlin's "
                                                "layout: the checkpoint does not match the model")
        g = 1 if self.group_size == -1 else cols // self.group_size
        return {
            "B": TensorSpec((cols // 16, rows * 2), (torch.int32,),
                            why=f"K={cols}/16 tile rows x N={rows}*16/8 words"),
            "s": TensorSpec((g, rows), (torch.float16, torch.bfloat16),
                            why=f"{g} groups x N={rows}"),
        }

    def reference(self, t, rows, cols, where):
        return marlin_format.dequantize(t["B"], t["s"], cols, rows, self.group_size)

    def to_int(self, t, rows, cols, where):
        q, scales = marlin_format.unpack(t["B"], t["s"], cols, rows, self.group_size)
        zeros = torch.full_like(scales, 8, dtype=torch.int32)
        return IntWeight(q, scales, zeros, None, cols if self.group_size == -1 else self.group_size, 4)


class MarlinConfig(QuantConfig):
    name = "marlin"

    def __init__(self, group_size: int, lm_head: bool = False, policy: str = "auto") -> None:
        self.group_size = group_size
        self.lm_head = lm_head
        self.policy = policy

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MarlinConfig":
        bits = check_int(config_get(config, "bits", default=4), "bits")
        if bits != 4:
            raise ConfigError(f"Marlin checkpoints are 4-bit, got bits={bits}")
        if config_get(config, "sym", default=True) is False:
            raise ConfigError("Marlin checkpoints are symmetric, got sym=false")
        if check_bool(config_get(config, "desc_act", default=False), "desc_act"):
            raise ConfigError("Marlin-format checkpoints carry no g_idx, so desc_act must be false")
        group = check_int(config_get(config, "group_size", default=128), "group_size")
        if group != -1 and group < 1:
            raise ConfigError(f"quantization setting 'group_size' = {group} must be positive or -1")
        return cls(group, check_bool(config_get(config, "lm_head", default=False), "lm_head"))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | EmbeddingMethod:
        from quantrt.models.layers import VocabEmbedding

        if isinstance(layer, VocabEmbedding):
            return UnquantizedEmbeddingMethod()
        if prefix == "lm_head" and not self.lm_head:
            return UnquantizedLinearMethod()
        return MarlinLinearMethod(self.group_size, self.policy)

    def settings(self) -> dict[str, Any]:
        return {"format": "marlin (pre-tiled)", "bits": 4, "group_size": self.group_size,
                "sym": True, "lm_head": self.lm_head}
