"""GPTQ checkpoints: AutoGPTQ (``checkpoint_format: gptq``, zeros stored minus one) and
GPTQModel (``gptq_v2``, true zeros); 2/3/4/8 bits, any group size or -1, sym and asym,
act-order (``desc_act``) through ``g_idx``, GPTQModel's per-module ``dynamic`` overrides.

``gptq_marlin`` is accepted as a name for the same on-disk format (vLLM's name for "GPTQ
with the fast kernel"): kernel choice is separate from the format here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from formats import gptq as gptq_format
from formats.packing import packed_length
from quantrt.errors import ConfigError, UnsupportedError
from quantrt.quant.base import (LinearMethod, EmbeddingMethod, QuantConfig, check_bool, check_int,
                                config_get, is_quantized)
from quantrt.quant.packed import IntWeight, PackedLinearMethod, TensorSpec
from quantrt.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
VERSIONS = {"gptq": 1, "gptq_v1": 1, "gptq_v2": 2}


@dataclass(frozen=True)
class GPTQParams:
    bits: int
    group_size: int             # -1: one group per output column
    sym: bool
    desc_act: bool
    version: int                # 1: AutoGPTQ (zero - 1 stored), 2: GPTQModel v2

    def __post_init__(self) -> None:
        check_int(self.bits, "bits", gptq_format.GPTQ_BITS)
        check_int(self.group_size, "group_size")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"quantization setting 'group_size' = {self.group_size} must be "
                              "positive or -1 (one group)")
        check_bool(self.sym, "sym")
        check_bool(self.desc_act, "desc_act")

    def label(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return (f"gptq{'_v2' if self.version == 2 else ''} {self.bits}-bit {group} "
                f"{'sym' if self.sym else 'asym'}{' act-order' if self.desc_act else ''}")


class GPTQLinearMethod(PackedLinearMethod):
    def __init__(self, params: GPTQParams, policy: str) -> None:
        super().__init__(policy)
        self.p = params
        self.label = params.label()

    def _groups(self, cols: int) -> int:
        return gptq_format.num_groups(cols, self.p.group_size)

    def specs(self, rows: int, cols: int) -> dict[str, TensorSpec]:
        b, g = self.p.bits, self._groups(cols)
        gs = self.p.group_size
        return {
            "qweight": TensorSpec((packed_length(cols, b), rows), (torch.int32,),
                                  why=f"K={cols} {b}-bit values packed along K into int32, N={rows}"),
            "qzeros": TensorSpec((g, packed_length(rows, b)), (torch.int32,),
                                 why=f"{g} groups (K={cols}, group_size={gs}) x N={rows} "
                                     f"{b}-bit zeros packed into int32"),
            "scales": TensorSpec((g, rows), FLOATS, why=f"{g} groups x N={rows}"),
            # AutoGPTQ always writes g_idx; some exporters drop it when it is k // g.
            "g_idx": TensorSpec((cols,), (torch.int32, torch.int64), required=False,
                                why=f"one group index per input column, K={cols}"),
        }

    def _unpack(self, t: dict[str, torch.Tensor], cols: int):
        return gptq_format.unpack(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                                  self.p.bits, self.p.group_size, self.p.version,
                                  in_features=cols)

    def reference(self, t, rows, cols, where):
        q, zeros, scales, g_idx = self._unpack(t, cols)
        from quant_kernels.int_ref import dequant_int

        return dequant_int(q, scales, zeros, g_idx, dtype=torch.float32)

    def to_int(self, t, rows, cols, where):
        q, zeros, scales, g_idx = self._unpack(t, cols)
        group = cols if self.p.group_size == -1 else self.p.group_size
        return IntWeight(q, scales, zeros, g_idx, group, self.p.bits)


def _parse_dynamic(dynamic: Any) -> tuple[tuple[str, re.Pattern, dict], ...]:
    """GPTQModel's ``dynamic``: ``{"-:regex": {}}`` skips matching modules,
    ``{"+:regex" or "regex": {bits: ...}}`` overrides settings for them."""
    if dynamic in (None, {}):
        return ()
    if not isinstance(dynamic, dict):
        raise ConfigError("quantization setting 'dynamic' must be an object of regex -> settings")
    rules = []
    for key, over in dynamic.items():
        sign, pattern = ("-", key[2:]) if key.startswith("-:") else (
            ("+", key[2:]) if key.startswith("+:") else ("+", key))
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"'dynamic' rule {key!r} is not a valid regex: {exc}") from None
        if not isinstance(over, dict):
            raise ConfigError(f"'dynamic' rule {key!r} must map to an object of settings")
        rules.append((sign, rx, over))
    return tuple(rules)


class GPTQConfig(QuantConfig):
    name = "gptq"
    aliases = ("gptq-marlin",)

    def __init__(self, params: GPTQParams, lm_head: bool = False, dynamic: tuple = (),
                 policy: str = "auto") -> None:
        self.params = params
        self.lm_head = lm_head
        self.dynamic = dynamic
        self.policy = policy

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        fmt = config_get(config, "checkpoint_format", "format", default="gptq")
        if not isinstance(fmt, str) or fmt.lower() not in (*VERSIONS, "marlin"):
            raise ConfigError(f"unknown GPTQ checkpoint_format {fmt!r}",
                              hint="expected gptq, gptq_v2 or marlin")
        if fmt.lower() == "marlin":
            raise UnsupportedError("GPTQ checkpoints saved in the pre-tiled Marlin layout "
                                   "(checkpoint_format: marlin) are not supported yet",
                                   hint="use the checkpoint's plain gptq export; quantrt repacks "
                                        "it for its fast kernel at load")
        params = GPTQParams(
            bits=config_get(config, "bits", "w_bit", "wbits", default=4),
            group_size=config_get(config, "group_size", "q_group_size", "groupsize", default=128),
            sym=config_get(config, "sym", default=True),
            desc_act=config_get(config, "desc_act", "act_order", default=False),
            version=VERSIONS[fmt.lower()])
        lm_head = check_bool(config_get(config, "lm_head", default=False), "lm_head")
        return cls(params, lm_head, _parse_dynamic(config.get("dynamic")))

    def _params_for(self, name: str) -> GPTQParams | None:
        """Settings of module ``name`` after the ``dynamic`` rules; None = not quantized."""
        for sign, rx, over in self.dynamic:
            if rx.match(name):
                if sign == "-":
                    return None
                known = {k: over[k] for k in ("bits", "group_size", "sym", "desc_act") if k in over}
                return replace(self.params, **known)
        return self.params

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | EmbeddingMethod:
        from quantrt.models.layers import VocabEmbedding

        if isinstance(layer, VocabEmbedding):
            return UnquantizedEmbeddingMethod()
        if prefix == "lm_head" and not self.lm_head:
            return UnquantizedLinearMethod()
        if not is_quantized(layer, lambda n: self._params_for(n) is not None):
            return UnquantizedLinearMethod()
        names = layer.shard_prefixes
        params = {self._params_for(n) for n in names}
        if len(params) > 1:
            raise UnsupportedError(f"'dynamic' gives the modules fused into {prefix} different "
                                   f"settings", hint="fused layers must share bits and group size")
        return GPTQLinearMethod(params.pop(), self.policy)

    def settings(self) -> dict[str, Any]:
        p = self.params
        out: dict[str, Any] = {"format": "gptq_v2" if p.version == 2 else "gptq (v1)",
                               "bits": p.bits, "group_size": p.group_size, "sym": p.sym,
                               "desc_act": p.desc_act, "lm_head": self.lm_head}
        if self.dynamic:
            out["dynamic"] = [f"{s}:{rx.pattern}" for s, rx, _ in self.dynamic]
        return out
