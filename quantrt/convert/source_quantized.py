"""A quantized HF checkpoint (GPTQ, AWQ, compressed-tensors, FP8, bitsandbytes, HQQ,
Marlin) as a conversion source.

Each quantized decoder linear appears under its float name (``....q_proj.weight``, shape
[N, K]); ``get`` dequantizes it with the format's own reference math (the oracle that
quantrt's loaders are tested against), and ``source_int_weight`` hands its integer codes
to a lossless transcode.  Everything else (embeddings, norms, lm_head) passes through.
"""
from __future__ import annotations

import types
from typing import Any

import torch

from quantrt.convert.source import LAYER, HFSource
from quantrt.errors import UnsupportedError

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """[N, K] of every decoder linear of a Llama-like config."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    return {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h),
            "self_attn.v_proj": (kv * d, h), "self_attn.o_proj": (h, heads * d),
            "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}


class QuantizedHFSource(HFSource):
    def __init__(self, path: str, raw_config: dict[str, Any], detected) -> None:
        from quantrt.quant.detect import resolve
        from quantrt.quant.packed import PackedLinearMethod

        super().__init__(path, raw_config)
        self.method_name = detected.method
        qcfg = resolve(detected, None, path)
        shapes = linear_shapes(self.config)
        keys = set(self.names)
        # module -> (method, N, K, tensor suffixes present)
        self.packed: dict[str, tuple[PackedLinearMethod, int, int, list[str]]] = {}
        for i in range(self.num_layers()):
            for local, (n, k) in shapes.items():
                module = f"model.layers.{i}.{local}"
                stub = types.SimpleNamespace(prefix=module, shard_prefixes=[module],
                                             input_size=k, output_sizes=[n])
                method = qcfg.get_quant_method(stub, module)
                if not isinstance(method, PackedLinearMethod):
                    continue  # left in float by the checkpoint: passes through
                suffixes = [s for s in method.specs(n, k) if f"{module}.{s}" in keys]
                if not suffixes:
                    raise UnsupportedError(f"{module}: no {detected.method} tensors found",
                                           where=path)
                self.packed[module] = (method, n, k, suffixes)
        # Every stored part of a packed module (HQQ adds metadata like .axis, bitsandbytes
        # .weight.absmax...) is replaced by its float name; its bias passes through.
        stored = {n for n in self.names if ".".join(n.split(".")[:5]) in self.packed
                  and n != ".".join(n.split(".")[:5]) + ".bias"}
        self.names = sorted([n for n in self.names if n not in stored]
                            + [f"{m}.weight" for m in self.packed])

    def _parts(self, name: str):
        module = name.removesuffix(".weight")
        entry = self.packed.get(module) if name.endswith(".weight") else None
        if entry is None:
            return None
        method, n, k, suffixes = entry
        tensors = {s: self._raw(module, s) for s in suffixes}
        return method, n, k, tensors

    def _raw(self, module: str, suffix: str) -> torch.Tensor:
        t = self.ckpt.get(f"{module}.{suffix}")
        return t.clone() if isinstance(t, torch.Tensor) else t

    def shape(self, name: str) -> tuple[int, ...]:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in self.packed:
            _, n, k, _ = self.packed[module]
            return (n, k)
        return super().shape(name)

    def get(self, name: str) -> torch.Tensor:
        parts = self._parts(name)
        if parts is None:
            return super().get(name)
        method, n, k, tensors = parts
        return method.reference(tensors, n, k, name).float()

    def source_int_weight(self, name: str):
        from quantrt.convert.transcode import from_packed

        parts = self._parts(name)
        if parts is None or LAYER.match(name) is None:
            return None
        method, n, k, tensors = parts
        iw = method.to_int(tensors, n, k, name)
        return None if iw is None else from_packed(iw, k)
