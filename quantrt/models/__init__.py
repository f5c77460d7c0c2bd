"""Model implementations, looked up through :mod:`quantrt.models.registry` by the architecture
a :class:`~quantrt.config.ModelConfig` names.  Importing this package loads no torch code (the
registry is read while configs are parsed); ``build_model`` imports the one model it builds."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from quantrt.config import ModelConfig
    from quantrt.quant.base import QuantConfig


def model_class(cfg: ModelConfig) -> Any:
    module, _, cls = cfg.arch_info.model.partition(":")
    return getattr(importlib.import_module(f"quantrt.models.{module}"), cls)


def build_model(cfg: ModelConfig, quant_config: QuantConfig, dtype) -> nn.Module:
    return model_class(cfg)(cfg, quant_config, dtype)
