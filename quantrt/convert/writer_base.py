"""The writer interface every target format implements, and the safetensors base."""
from __future__ import annotations

import os
from typing import Any

import torch

from quantrt.convert.intq import IntWeight
from quantrt.convert.output import ShardedSafetensors, write_json
from quantrt.convert.request import ConvertRequest
from quantrt.convert.source import ConvertSource

QUANTIZER = "quantrt"


class Writer:
    """Receives every tensor of the model once, under its HF name, then ``finish``es."""

    def __init__(self, req: ConvertRequest, source: ConvertSource, out_dir: str) -> None:
        self.req = req
        self.source = source
        self.out_dir = out_dir
        self.dtype = getattr(torch, req.dtype)

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.dtype.is_floating_point else t

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        """A tensor kept in float: embeddings, norms, biases, lm_head."""
        raise NotImplementedError

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        """A decoder linear ``name`` (``....weight``) W [N, K]; ``iw`` is its integer
        quantization when an algorithm (GPTQ, AWQ) already made it."""
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class SafetensorsWriter(Writer):
    """HF directory: sharded safetensors + config.json with ``quantization_config``."""

    def __init__(self, req: ConvertRequest, source: ConvertSource, out_dir: str) -> None:
        super().__init__(req, source, out_dir)
        self.shards = ShardedSafetensors(out_dir, req.shard_bytes)

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self.shards.add(name, self.cast(t))

    def quantization_config(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def side_configs(self) -> dict[str, dict[str, Any]]:
        """Extra JSON files some loaders read instead of config.json."""
        return {}

    def finish(self) -> None:
        self.shards.close()
        cfg = dict(self.source.config)
        cfg["torch_dtype"] = self.req.dtype
        cfg["dtype"] = self.req.dtype
        qc = self.quantization_config()
        if qc is not None:
            cfg["quantization_config"] = qc
        write_json(os.path.join(self.out_dir, "config.json"), cfg)
        for fname, obj in self.side_configs().items():
            write_json(os.path.join(self.out_dir, fname), obj)
        self.source.write_side_files(self.out_dir)


def module_of(name: str) -> str:
    return name.removesuffix(".weight")
