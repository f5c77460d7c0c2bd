"""Model implementations, looked up by the family name a :class:`ModelConfig` carries."""
from __future__ import annotations

from torch import nn

from quantrt.config import ModelConfig
from quantrt.quant.base import QuantConfig


def build_model(cfg: ModelConfig, quant_config: QuantConfig, dtype) -> nn.Module:
    from quantrt.models.llama import LlamaForCausalLM

    families = {"llama": LlamaForCausalLM}
    return families[cfg.family](cfg, quant_config, dtype)
