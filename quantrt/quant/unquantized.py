"""Unquantized fp32 / fp16 / bf16 weights: just another quantization method."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.errors import FormatError
from quantrt.parallel.slicing import take
from quantrt.quant.base import EmbeddingMethod, KernelChoice, LinearMethod, QuantConfig


def _as_tensor(tensor: Any, where: str) -> torch.Tensor:
    if isinstance(tensor, torch.Tensor):
        return tensor
    to_float = getattr(tensor, "to_float", None)  # packed formats that can only be dequantized
    if to_float is not None:
        return to_float()
    raise FormatError(f"tensor {where} has an unexpected type {type(tensor).__name__}")


class UnquantizedLinearMethod(LinearMethod):
    """The checkpoint's tensors are kept as loaded (often memory-mapped) until
    ``process_weights_after_loading`` converts them, so a tensor-parallel rank only ever
    copies its own rows or columns."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        layer.weight_shards = [None] * len(output_sizes)
        layer.params_dtype = params_dtype
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
        if not t.dtype.is_floating_point:
            raise FormatError(f"tensor {where} has dtype {str(t.dtype).removeprefix('torch.')}, "
                              "expected a float dtype")
        layer.weight_shards[shard] = t
        layer.tracker.mark("weight", shard)

    def shard(self, layer: nn.Module, rows, cols) -> None:
        shards = layer.weight_shards
        if rows is not None:
            shards = [take(t, 0, r) for t, r in zip(shards, rows)]
        if cols is not None:
            shards = [take(t, 1, [cols]) for t in shards]
        layer.weight_shards = shards

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        shards = [t.to(layer.params_dtype) for t in layer.weight_shards]
        w = shards[0] if len(shards) == 1 else torch.cat(shards)
        moved = w.to(device)
        if moved is layer.weight_shards[0] and not getattr(layer, "tied", False):
            moved = moved.clone()  # own the memory: the source may be a read-only file map
        layer.weight = nn.Parameter(moved.contiguous(), requires_grad=False)
        layer.weight_shards = None
        layer.kernel_choice = KernelChoice("torch F.linear (cuBLAS/oneDNN)")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def tie_to(self, layer: nn.Module, embedding: nn.Module) -> None:
        layer.weight_shards = [embedding.weight.data]
        layer.tied = True
        layer.tracker.mark("weight", 0)

    def describe(self, layer: nn.Module) -> str:
        w = getattr(layer, "weight", None)
        w = w if w is not None else (layer.weight_shards or [None])[0]
        return str(w.dtype).removeprefix("torch.") if w is not None else "unloaded"


class UnquantizedEmbeddingMethod(EmbeddingMethod):
    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype) -> None:
        layer.weight_src = None
        layer.tracker.expected.add(("weight", 0))

    def load_weight(self, layer: nn.Module, name: str, tensor: Any) -> None:
        where = f"{layer.prefix}.{name}"
        t = _as_tensor(tensor, where)
        want = (layer.num_embeddings, layer.embedding_dim)
        if name != "weight" or tuple(t.shape) != want:
            raise FormatError(f"tensor {where} has shape {tuple(t.shape)}, expected {want}")
        layer.weight_src = t
        layer.tracker.mark("weight", 0)

    def shard_rows(self, layer: nn.Module, start: int, end: int) -> None:
        layer.weight_src = layer.weight_src[start:end]

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        src = layer.weight_src
        w = src.to(dtype=layer.params_dtype, device=device)
        layer.weight = nn.Parameter(w.clone() if w is src else w.contiguous(), requires_grad=False)
        layer.weight_src = None

    def embed(self, layer: nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, layer.weight).to(dtype)

    def describe(self, layer: nn.Module) -> str:
        w = getattr(layer, "weight", None)
        return str((w if w is not None else layer.weight_src).dtype).removeprefix("torch.")


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
