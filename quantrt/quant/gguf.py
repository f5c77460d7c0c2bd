"""GGUF: every tensor carries its own GGML type; weights stay packed in memory.

Fused layers (qkv, gate_up) keep one packed tensor per shard; shards of the same type are
concatenated row-wise once loaded (GGML blocks run along a row, so rows are independent).
"""
from __future__ import annotations

import collections
from typing import Any

import gguf
import torch
from torch import nn

from quantrt.errors import FormatError
from quantrt.parallel.plan import lcm
from quantrt.parallel.slicing import take
from quantrt.quant.base import EmbeddingMethod, KernelChoice, LinearMethod, QuantConfig
from quantrt.quant.ggml_kernels import FLOAT_TYPES, GGMLKernel, GGMLTensor, pick_kernel
from quant_kernels import gguf_ref


def block_elems(ggml_type: int) -> int:
    """Values per GGML block (1 for float types)."""
    return 1 if ggml_type in FLOAT_TYPES else gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)][0]


def block_bytes(ggml_type: int) -> int:
    """Stored columns per block: its bytes, or 1 for float types (stored as floats)."""
    if ggml_type in FLOAT_TYPES:
        return 1
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)][1]


def _check(layer: nn.Module, name: str, t: Any, rows: int, cols: int) -> GGMLTensor:
    where = f"{layer.prefix}.{name}"
    if not isinstance(t, GGMLTensor):
        raise FormatError(f"tensor {where} is not a GGUF tensor")
    if t.shape != (rows, cols):
        raise FormatError(f"tensor {where} has shape {t.shape}, expected ({rows}, {cols})")
    return t


class GGUFLinearMethod(LinearMethod):
    def __init__(self, policy: str) -> None:
        self.policy = policy

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        layer.ggml_shards = [None] * len(output_sizes)
        layer.params_dtype = params_dtype
        layer.tracker.expected |= {("weight", s) for s in range(len(output_sizes))}

    def load_weight(self, layer: nn.Module, name: str, tensor: Any, shard: int) -> None:
        if name != "weight":
            raise FormatError(f"unexpected GGUF tensor {layer.prefix}.{name}")
        layer.ggml_shards[shard] = _check(layer, name, tensor, layer.output_sizes[shard],
                                          layer.input_size)
        layer.tracker.mark("weight", shard)

    def tie_to(self, layer: nn.Module, embedding: nn.Module) -> None:
        layer.ggml_shards = [embedding.ggml]
        layer.tracker.mark("weight", 0)

    def tp_units(self, layer: nn.Module) -> tuple[int, int]:
        # rows are independent; a row is cut only between GGML blocks
        return 1, lcm(*(block_elems(s.ggml_type) for s in layer.ggml_shards))

    def shard(self, layer: nn.Module, rows, cols) -> None:
        out = []
        for i, s in enumerate(layer.ggml_shards):
            if rows is not None:
                s = GGMLTensor(take(s.data, 0, rows[i]), s.ggml_type,
                               (sum(b - a for a, b in rows[i]), s.shape[1]))
            if cols is not None:
                elems, nbytes = block_elems(s.ggml_type), block_bytes(s.ggml_type)
                byte_range = (cols[0] // elems * nbytes, cols[1] // elems * nbytes)
                s = GGMLTensor(take(s.data, 1, [byte_range]), s.ggml_type,
                               (s.shape[0], cols[1] - cols[0]))
            out.append(s)
        layer.ggml_shards = out

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        shards: list[GGMLTensor] = layer.ggml_shards
        if len(shards) > 1 and len({s.ggml_type for s in shards}) == 1:
            first = shards[0]
            shards = [GGMLTensor(torch.cat([s.data for s in shards]), first.ggml_type,
                                 (sum(s.shape[0] for s in shards), first.shape[1]))]
        pieces: list[tuple[GGMLTensor, GGMLKernel]] = []
        refused: list[tuple[str, str]] = []
        names = []
        for s in shards:
            kernel_cls, why = pick_kernel(s, device, self.policy)
            if kernel_cls.reads_raw:
                s = s.to(device)
            pieces.append((s, kernel_cls(s, layer.params_dtype, device)))
            refused.extend(r for r in why if r not in refused)
            names.append(kernel_cls.name)
        layer.ggml_pieces = pieces
        layer.ggml_shards = [p[0] for p in pieces]
        # GGML bytes count only where they sit on the device (a repacking kernel leaves
        # them in the memory-mapped file)
        layer.kernel_tensors = [p[0].data for p in pieces if p[0].data.device.type == device.type] \
            + [t for p in pieces for t in p[1].tensors()]
        layer.kernel_choice = KernelChoice(" + ".join(dict.fromkeys(names)), tuple(refused))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # The model always passes [tokens, features]; other ranks are flattened (each torch
        # op costs ~10 us on a small CPU, so the common case skips the reshapes).
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        pieces = layer.ggml_pieces
        if len(pieces) == 1:
            y = pieces[0][1](x2)
        else:
            y = torch.cat([kernel(x2) for _, kernel in pieces], dim=-1)
        if bias is not None:
            y = y + bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    def describe(self, layer: nn.Module) -> str:
        shards = [s for s in layer.ggml_shards if s is not None]
        return "/".join(dict.fromkeys(s.type_name for s in shards)) or "unloaded"


class GGUFEmbeddingMethod(EmbeddingMethod):
    """Looks rows up in the packed table and dequantizes only those rows."""

    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype) -> None:
        layer.ggml = None
        layer.tracker.expected.add(("weight", 0))

    def load_weight(self, layer: nn.Module, name: str, tensor: Any) -> None:
        layer.ggml = _check(layer, name, tensor, layer.num_embeddings, layer.embedding_dim)
        layer.tracker.mark("weight", 0)

    def shard_rows(self, layer: nn.Module, start: int, end: int) -> None:
        g = layer.ggml
        layer.ggml = GGMLTensor(g.data[start:end], g.ggml_type, (end - start, g.shape[1]))

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        layer.ggml = layer.ggml.to(device)
        layer.kernel_tensors = [layer.ggml.data]

    def embed(self, layer: nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w: GGMLTensor = layer.ggml
        rows = w.data[ids]
        if w.ggml_type in FLOAT_TYPES:
            return rows.to(dtype)
        return gguf_ref.dequantize(rows, w.ggml_type, (ids.numel(), w.shape[1])).to(dtype)

    def describe(self, layer: nn.Module) -> str:
        return layer.ggml.type_name if layer.ggml is not None else "unloaded"


class GGUFConfig(QuantConfig):
    """Settings of a GGUF file: its declared file type and the per-tensor type counts."""

    name = "gguf"

    def __init__(self, file_type: int | None = None, tensor_types: dict[str, int] | None = None,
                 policy: str = "auto") -> None:
        self.file_type = file_type
        self.tensor_types = dict(tensor_types or {})
        self.policy = policy

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GGUFConfig":
        return cls(config.get("file_type"), config.get("tensor_types"))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | EmbeddingMethod:
        from quantrt.models.layers import VocabEmbedding

        if isinstance(layer, VocabEmbedding):
            return GGUFEmbeddingMethod()
        return GGUFLinearMethod(self.policy)

    def settings(self) -> dict[str, Any]:
        import gguf

        out: dict[str, Any] = {}
        if self.file_type is not None:
            try:
                out["file_type"] = gguf.LlamaFileType(self.file_type).name.removeprefix("MOSTLY_")
            except ValueError:
                out["file_type"] = str(self.file_type)
        out["tensor_types"] = dict(collections.Counter(self.tensor_types.values()).most_common())
        return out
