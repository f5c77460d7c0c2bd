"""Unquantized fp32 / fp16 / bf16 weights: just another quantization method."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.errors import FormatError
from quantrt.quant.base import EmbeddingMethod, KernelChoice, LinearMethod, QuantConfig


def _as_tensor(tensor: Any, where: str) -> torch.Tensor:
    if isinstance(tensor, torch.Tensor):
        return tensor
    to_float = getattr(tensor, "to_float", None)  # packed formats that can only be dequantized
    if to_float is not None:
        return to_float()
    raise FormatError(f"tensor {where} has an unexpected type {type(tensor).__name__}")


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype),
                                    requires_grad=False)
        layer.tracker.expected |= {("weight", s) for s in range(len(output_sizes))}

    def load_weight(self, layer: nn.Module, name: str, tensor: Any, shard: int) -> None:
        where = f"{layer.prefix}.{name}"
        if name != "weight":
            raise FormatError(f"unexpected tensor {where} for an unquantized layer",
                              hint="the checkpoint looks quantized: check its quantization_config")
        t = _as_tensor(tensor, where)
        rows = layer.output_sizes[shard]
        if tuple(t.shape) != (rows, layer.input_size):
            raise FormatError(f"tensor {where} (shard {shard}) has shape {tuple(t.shape)}, "
                              f"expected ({rows}, {layer.input_size})")
        off = layer.shard_offset(shard)
        layer.weight.data[off:off + rows].copy_(t)
        layer.tracker.mark("weight", shard)

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        layer.weight = nn.Parameter(layer.weight.data.to(device), requires_grad=False)
        layer.kernel_choice = KernelChoice("torch F.linear (cuBLAS/oneDNN)")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def tie_to(self, layer: nn.Module, embedding: nn.Module) -> None:
        layer.weight = embedding.weight
        layer.tracker.mark("weight", 0)

    def describe(self, layer: nn.Module) -> str:
        return str(layer.weight.dtype).removeprefix("torch.")


class UnquantizedEmbeddingMethod(EmbeddingMethod):
    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=params_dtype),
                                    requires_grad=False)
        layer.tracker.expected.add(("weight", 0))

    def load_weight(self, layer: nn.Module, name: str, tensor: Any) -> None:
        where = f"{layer.prefix}.{name}"
        t = _as_tensor(tensor, where)
        if name != "weight" or tuple(t.shape) != tuple(layer.weight.shape):
            raise FormatError(f"tensor {where} has shape {tuple(t.shape)}, "
                              f"expected {tuple(layer.weight.shape)}")
        layer.weight.data.copy_(t)
        layer.tracker.mark("weight", 0)

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        layer.weight = nn.Parameter(layer.weight.data.to(device), requires_grad=False)

    def embed(self, layer: nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, layer.weight).to(dtype)

    def describe(self, layer: nn.Module) -> str:
        return str(layer.weight.dtype).removeprefix("torch.")


class UnquantizedConfig(QuantConfig):
    name = "none"
    aliases = ("unquantized",)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "UnquantizedConfig":
        return cls()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | EmbeddingMethod:
        from quantrt.models.layers import VocabEmbedding

        if isinstance(layer, VocabEmbedding):
            return UnquantizedEmbeddingMethod()
        return UnquantizedLinearMethod()
