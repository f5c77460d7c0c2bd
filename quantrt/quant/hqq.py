"""HQQ checkpoints: hqq's own ``qmodel.pt`` (settings read from its per-layer metadata by
detection) and transformers' HQQ serialisation (``quant_method: hqq`` with ``quant_config``
and ``skip_modules``; tensors ``<layer>.W_q``, ``.scale``, ``.zero`` and metadata such as
``.nbits``).  1-8 bits (and 1.58), any group size or none, axis 0 or 1, float zeros.

``W = (W_q - zero) * scale`` per group, where a group is ``group_size`` consecutive values
of the row-major weight (axis 1) or a strided set of them (axis 0); see formats.hqq.
With axis 1 the layer is integer-affine along K: when the group size does not divide K
(groups run on into the next row), groups are split at every boundary any row has, which
gives ``gcd(K, group_size)`` columns per group with each piece's own scale and zero.
Axis 0 groups run along N, so those layers take the reference path.

HQQ subtracts the float zero in its compute dtype (fp16): we compute in fp32, which
differs from hqq's fp16 result in about 0.1% of the weights by at most 2.6e-4 on the
fixtures; tests/test_quant_methods.py states the resulting tolerances.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from formats import hqq as hqq_format
from formats.hqq_checkpoint import decode_meta, linear_tag
from quantrt.errors import ConfigError, FormatError, UnsupportedError
from quantrt.quant.base import (EmbeddingMethod, LinearMethod, QuantConfig, check_bool, check_int,
                                is_quantized)
from quantrt.quant.packed import IntWeight, PackedLinearMethod, TensorSpec
from quantrt.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod

NBITS = (1, 1.58, 2, 3, 4, 5, 6, 8)  # hqq's Quantizer.SUPPORTED_BITS (7 has no packing)
# Metadata hqq stores per layer that does not change the tensors' layout.
_INFO_KEYS = ("unpack_view_dtype", "compute_dtype", "offload_meta", "encoded_state_dict",
              "stores_quant_config", "channel_wise", "optimize", "round_zero")


@dataclass(frozen=True)
class HQQParams:
    nbits: float
    group_size: int | None      # None: one group per row (axis 1) or column (axis 0)
    axis: int
    view_as_float: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.nbits, bool) or self.nbits not in NBITS:
            raise ConfigError(f"quantization setting 'nbits' = {self.nbits!r} is not supported",
                              hint=f"HQQ packs {', '.join(map(str, NBITS))} bits")
        if self.group_size is not None:
            check_int(self.group_size, "group_size", minimum=1)
        check_int(self.axis, "axis", (0, 1))
        check_bool(self.view_as_float, "view_as_float")

    @property
    def packing(self) -> str:
        return hqq_format.BIT_TO_PACKING[self.nbits]

    @property
    def int_bits(self) -> int:
        return math.ceil(self.nbits)  # 1.58-bit (ternary) codes are 2-bit values

    def label(self) -> str:
        group = "per-row" if self.group_size is None else f"g{self.group_size}"
        return f"hqq {self.nbits:g}-bit {group} axis{self.axis}"

    def as_dict(self) -> dict[str, Any]:
        return {"nbits": self.nbits, "group_size": self.group_size, "axis": self.axis,
                "view_as_float": self.view_as_float}


class HQQLinearMethod(PackedLinearMethod):
    def __init__(self, params: HQQParams, policy: str) -> None:
        super().__init__(policy)
        self.p = params
        self.label = params.label()

    def _view(self, rows: int, cols: int) -> tuple[int, int]:
        return hqq_format.view_shape((rows, cols), self.p.group_size, self.p.axis)

    def specs(self, rows: int, cols: int) -> dict[str, TensorSpec]:
        r, c = self._view(rows, cols)
        _, per, container = hqq_format.PACKINGS[self.p.packing]
        if container == torch.uint8 and r % per:
            raise UnsupportedError(f"HQQ {self.p.packing} packs {per} rows per byte but this "
                                   f"layer's [{rows}, {cols}] weight has {r} rows in its "
                                   f"group view (hqq itself mis-packs such layers)")
        view = (f"[{rows}, {cols}] viewed as [{r}, {c}] (group_size={self.p.group_size}, "
                f"axis={self.p.axis})")
        sshape = (r, 1) if self.p.axis == 1 else (1, c)
        return {
            "W_q": TensorSpec((-(-r // per), c), (container,),
                              why=f"{view}, {per} rows per {self.p.packing} word"),
            "scale": TensorSpec(sshape, why=f"one per group of {view}"),
            "zero": TensorSpec(sshape, why=f"one per group of {view}"),
        }

    def load_weight(self, layer: nn.Module, name: str, tensor: Any, shard: int) -> None:
        if name in ("nbits", "group_size", "axis", "shape", "packing", "view_as_float",
                    "quant_scale", "quant_zero", *_INFO_KEYS):
            self._check_meta(layer, name, tensor, shard)
            return
        if name == "W_q" and self.p.view_as_float and isinstance(tensor, torch.Tensor) \
                and tensor.dtype.is_floating_point:
            # view_as_float stores the packed words reinterpreted as the compute dtype.
            tensor = tensor.contiguous().view(hqq_format.PACKINGS[self.p.packing][2])
        super().load_weight(layer, name, tensor, shard)

    def _check_meta(self, layer: nn.Module, name: str, tensor: Any, shard: int) -> None:
        """A layer's own metadata must agree with the settings its tensors are read with."""
        where = f"{layer.prefix}.{name}" + (f" (shard {shard})" if len(layer.output_sizes) > 1 else "")
        if name in _INFO_KEYS:
            return
        if not isinstance(tensor, torch.Tensor):
            raise FormatError(f"tensor {where} has an unexpected type {type(tensor).__name__}")
        rows = layer.output_sizes[shard]
        want: dict[str, tuple[type, Any]] = {
            # hqq records group_size None as the group it amounts to (K or N).
            "nbits": (float, float(self.p.nbits)),
            "group_size": (int, self.p.group_size or (layer.input_size if self.p.axis else rows)),
            "axis": (int, self.p.axis), "shape": (tuple, (rows, layer.input_size)),
            "packing": (str, self.p.packing), "view_as_float": (bool, self.p.view_as_float),
            "quant_scale": (bool, False), "quant_zero": (bool, False)}
        kind, expected = want[name]
        try:
            got = decode_meta(tensor, kind)
        except (ValueError, OverflowError) as exc:
            raise FormatError(f"HQQ metadata {where} is unreadable ({exc})") from None
        if name in ("quant_scale", "quant_zero") and got:
            raise UnsupportedError(f"{where} is true: the layer stores quantized scale/zero "
                                   f"(deprecated by hqq), which quantrt does not support")
        same = abs(got - expected) < 1e-3 if kind is float else got == expected
        if not same:
            raise FormatError(f"HQQ metadata {where} = {got!r} but the layer is read with "
                              f"{name} = {expected!r}",
                              hint="the quantization settings do not match the stored layer")

    def reference(self, t, rows, cols, where):
        return hqq_format.dequantize(t["W_q"], t["scale"], t["zero"], (rows, cols),
                                     self.p.group_size, self.p.axis, self.p.packing,
                                     compute_dtype=torch.float32, dtype=torch.float32)

    def to_int(self, t, rows, cols, where):
        if self.p.axis != 1:
            return None  # groups run along N: not integer-affine along K
        r, _ = self._view(rows, cols)
        codes = hqq_format.unpack(t["W_q"], self.p.packing, rows=r)
        g = self.p.group_size or cols
        fine = math.gcd(cols, g)  # every row's group boundaries fall on multiples of this
        starts = torch.arange(0, cols, fine)
        idx = (torch.arange(rows)[None, :] * cols + starts[:, None]) // g  # [K / fine, N]
        scales = t["scale"].reshape(-1)[idx]
        zeros = t["zero"].reshape(-1)[idx]
        return IntWeight(codes.reshape(rows, cols).t(), scales, zeros, None, fine,
                         self.p.int_bits)


def _params(raw: Any, key: str) -> HQQParams | None:
    """One BaseQuantizeConfig dict (``{"weight_quant_params": {...}, ...}``, or the weight
    parameters themselves) -> HQQParams; None leaves the layers unquantized."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"quantization setting {key!r} must be an object, got {raw!r}")
    for meta in ("scale_quant_params", "zero_quant_params"):
        if raw.get(meta):
            raise UnsupportedError(f"HQQ {key}.{meta}: quantized scale/zero (deprecated by "
                                   f"hqq) is not supported")
    wq = raw.get("weight_quant_params", raw)
    if "weight_quant_params" in raw:
        key += ".weight_quant_params"
    if not isinstance(wq, dict):
        raise ConfigError(f"quantization setting {key!r} must be an object")
    if "nbits" not in wq:
        raise ConfigError(f"quantization setting '{key}' has no 'nbits'")
    nbits = wq["nbits"]
    if isinstance(nbits, float) and nbits.is_integer():
        nbits = int(nbits)
    try:
        return HQQParams(nbits, wq.get("group_size", 64), wq.get("axis", 1),
                         wq.get("view_as_float", False))
    except ConfigError as exc:
        raise ConfigError(exc.message.replace("setting '", f"setting '{key}."), hint=exc.hint) from None


class HQQConfig(QuantConfig):
    name = "hqq"

    def __init__(self, default: HQQParams | None, by_tag: dict[str, HQQParams | None] | None,
                 skip: tuple[str, ...] = ("lm_head",), policy: str = "auto",
                 source: str | None = None) -> None:
        self.default = default
        self.by_tag = by_tag      # transformers' dynamic_config: linear tag -> settings
        self.skip = skip
        self.policy = policy
        self.source = source

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HQQConfig":
        # transformers nests the settings under quant_config; a flat hand-written form
        # ({"nbits": 4, ...} or {"weight_quant_params": {...}}) is read the same way.
        flat = "weight_quant_params" in config or "nbits" in config
        qc = config if flat else config.get("quant_config")
        if not isinstance(qc, dict) or not qc:
            raise ConfigError("HQQ settings have no 'quant_config'",
                              hint="expected transformers' HQQ quantization_config "
                                   "(quant_config, skip_modules)")
        skip = config.get("skip_modules", ["lm_head"])
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise ConfigError("quantization setting 'skip_modules' must be a list of names")
        source = config.get("checkpoint")
        if "weight_quant_params" in qc or "nbits" in qc:
            return cls(_params(qc, "quant_config"), None, tuple(skip), source=source)
        by_tag = {tag: _params(sub, f"quant_config.{tag}") for tag, sub in qc.items()}
        return cls(None, by_tag, tuple(skip), source=source)

    def params_for(self, name: str) -> HQQParams | None:
        tag = linear_tag(name)
        if tag in self.skip or name in self.skip:
            return None
        if self.by_tag is not None:
            # transformers quantizes only the tags dynamic_config names.
            return self.by_tag.get(tag)
        return self.default

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | EmbeddingMethod:
        from quantrt.models.layers import VocabEmbedding

        if isinstance(layer, VocabEmbedding):
            return UnquantizedEmbeddingMethod()
        if not is_quantized(layer, lambda n: self.params_for(n) is not None):
            return UnquantizedLinearMethod()
        params = {self.params_for(n) for n in layer.shard_prefixes}
        if len(params) > 1:
            raise UnsupportedError(f"the HQQ modules fused into {prefix} use different settings",
                                   hint="fused q/k/v and gate/up layers must share nbits, "
                                        "group_size and axis")
        return HQQLinearMethod(params.pop(), self.policy)

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.source:
            out["checkpoint"] = self.source
        if self.default is not None:
            out.update(self.default.as_dict())
        else:
            out["dynamic"] = {t: (p.as_dict() if p else None) for t, p in sorted(self.by_tag.items())}
        out["skip_modules"] = list(self.skip)
        return out
