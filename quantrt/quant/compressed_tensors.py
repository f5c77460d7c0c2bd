"""compressed-tensors checkpoints (llm-compressor): ``config_groups`` (targets, weights,
input_activations), ``ignore`` and a format per group or checkpoint.  ``pack-quantized``
(1-8-bit ints in int32) and ``int-``/``naive-quantized`` (int8) run on the integer kernels;
``float-quantized`` FP8 (tensor/channel/group/block scales) without input activations runs
on the fused FP8 Triton kernel on CUDA, and is dequantized per call elsewhere.

With ``input_activations`` (FP8 or int8 W8A8) the library's forward quantizes activations
too, and so do we, bit-exactly as its fake quantization (dynamic per token / tensor / group,
or the static ``input_scale``) in the activation dtype; such layers skip the weight-only
integer kernels.  On CUDA sm89+, FP8 W8A8 with per-tensor/channel weight scales and
per-token or static activations runs on ``torch._scaled_mm``.

Targets as in compressed-tensors: exact names beat ``re:`` regexes (``re.match``), which
beat the class name ``Linear``; a later group wins a repeated target; ``ignore`` likewise.
3/5/6/7-bit values straddle int32 words from compressed-tensors 0.19 on (older releases
padded each word): the config's ``version`` decides.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formats import compressed_tensors as ct_format
from formats.packing import packed_length
from quantrt.errors import ConfigError, FormatError, UnsupportedError
from quantrt.quant.base import (EmbeddingMethod, LinearMethod, QuantConfig, check_bool, check_int,
                                is_quantized)
from quantrt.quant.fp8_kernels import Fp8ScaledMMKernel, Fp8TritonKernel
from quantrt.quant.int_kernels import INT_KERNELS
from quantrt.quant.packed import IntWeight, PackedLinearMethod, ReferenceKernel, TensorSpec
from quantrt.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INTS = (torch.int8, torch.int32, torch.int64)
FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
STRATEGIES = ("tensor", "channel", "group", "block", "token")
FP8_MAX = 448.0
F32 = torch.float32


@dataclass(frozen=True)
class QuantArgs:
    """One ``weights`` or ``input_activations`` entry, as written (strategy None is inferred
    from group_size as compressed-tensors does); ``key`` names it in errors."""

    num_bits: Any
    type: Any
    symmetric: Any
    strategy: Any
    group_size: Any
    block_structure: Any
    dynamic: Any
    actorder: Any
    weights: bool = field(default=True, compare=False)
    key: str = field(default="", compare=False)

    @classmethod
    def parse(cls, raw: Any, key: str, weights: bool) -> "QuantArgs":
        if not isinstance(raw, dict):
            raise ConfigError(f"quantization setting {key!r} must be an object, got {raw!r}")
        return cls(raw.get("num_bits", 8), raw.get("type", "int"), raw.get("symmetric", True),
                   raw.get("strategy"), raw.get("group_size"), raw.get("block_structure"),
                   raw.get("dynamic", False), raw.get("actorder") or None, weights, key)

    def __post_init__(self) -> None:
        key, set_ = self.key, lambda k, v: object.__setattr__(self, k, v)
        if self.type not in ("int", "float"):
            raise ConfigError(f"quantization setting '{key}.type' = {self.type!r} (int or float)")
        bits = check_int(self.num_bits, f"{key}.num_bits")
        if self.type == "float" and bits != 8:
            raise UnsupportedError(f"'{key}': {bits}-bit floats (NVFP4/MXFP4) are not supported")
        if self.type == "int" and not 1 <= bits <= 8:
            raise ConfigError(f"quantization setting '{key}.num_bits' = {bits} is not supported",
                              hint="integer formats take 1 to 8 bits")
        check_bool(self.symmetric, f"{key}.symmetric")
        group = None if self.group_size is None else check_int(self.group_size,
                                                               f"{key}.group_size")
        strategy = self.strategy or ("tensor" if group is None else
                                     "channel" if group == -1 else "group")
        if strategy not in STRATEGIES:
            raise (UnsupportedError if strategy in ("tensor_group", "attn_head") else ConfigError)(
                f"quantization setting '{key}.strategy' = {strategy!r} is not supported",
                hint=f"expected one of {', '.join(STRATEGIES)}")
        set_("strategy", strategy)
        if strategy == "group" and (group is None or group < 1):
            raise ConfigError(f"quantization setting '{key}.group_size' must be positive for "
                              f"strategy group, got {group!r}")
        set_("group_size", group if strategy == "group" else None)
        block = self.block_structure
        if strategy == "block" and not (isinstance(block, (list, tuple)) and len(block) == 2
                                        and all(type(b) is int and b > 0 for b in block)):
            raise ConfigError(f"quantization setting '{key}.block_structure' must be two "
                              f"positive integers for strategy block, got {block!r}")
        set_("block_structure", tuple(block) if strategy == "block" else None)
        if self.dynamic == "local" or not isinstance(self.dynamic, bool):
            raise UnsupportedError(f"'{key}.dynamic' = {self.dynamic!r} is not supported")
        if self.weights and (self.dynamic or strategy == "token"):
            raise ConfigError(f"'{key}': weights cannot be quantized dynamically or per token")
        if not self.weights and strategy not in (("token", "tensor", "group") if self.dynamic
                                                 else ("tensor",)):
            raise UnsupportedError(f"'{key}': {'dynamic' if self.dynamic else 'static'} "
                                   f"{strategy} activation scales are not supported")
        if self.actorder not in (None, "group", "weight", "static"):
            raise ConfigError(f"quantization setting '{key}.actorder' = {self.actorder!r}")

    def label(self) -> str:
        how = {"group": f"g{self.group_size}", "block": "block {}x{}".format(*self.block_structure
                                                                             or (0, 0))}
        kind = "fp8" if self.type == "float" else f"int{self.num_bits}"
        return (f"{kind} {how.get(self.strategy, self.strategy)}"
                f"{'' if self.symmetric else ' asym'}{' dynamic' if self.dynamic else ''}")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("weights", "key")}


@dataclass(frozen=True)
class Scheme:
    weights: QuantArgs
    acts: QuantArgs | None
    format: str
    dense: bool = True

    def __post_init__(self) -> None:
        w = self.weights
        if self.format not in FORMATS:
            raise UnsupportedError(f"compressed-tensors format {self.format!r} is not supported",
                                   hint=f"supported: {', '.join(FORMATS)}")
        if w.type != {"float-quantized": "float", "pack-quantized": "int"}.get(self.format, w.type):
            raise ConfigError(f"'{w.key}': {w.type} weights cannot be stored {self.format}")
        if w.type == "int" and w.strategy == "block":
            raise UnsupportedError(f"'{w.key}': block-wise integer weights are not supported")
        if w.type == "float" and not w.symmetric:
            raise UnsupportedError(f"'{w.key}': asymmetric FP8 weights are not supported")

    def label(self) -> str:
        acts = f", {self.acts.label()} activations" if self.acts else ""
        return f"compressed-tensors {self.format} {self.weights.label()}{acts}"


def _scale_shape(w: QuantArgs, rows: int, cols: int) -> tuple[int, ...]:
    return {"tensor": lambda: (1,), "channel": lambda: (rows, 1),
            "group": lambda: (rows, -(-cols // w.group_size)),
            "block": lambda: (-(-rows // w.block_structure[0]),
                              -(-cols // w.block_structure[1]))}[w.strategy]()


def _scale_axes(w: QuantArgs) -> dict:
    """Which axes of a scale (or zero point) follow N and K, for tensor-parallel cuts."""
    return {"tensor": {}, "channel": {"n": (0, 1)},
            "group": {"n": (0, 1), "k": (1, w.group_size or 1)},
            "block": {"n": (0, (w.block_structure or (1, 1))[0]),
                      "k": (1, (w.block_structure or (1, 1))[1])}}[w.strategy]


def fake_quant(x: torch.Tensor, a: QuantArgs, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations ``x [M, K]`` in x's dtype as compressed-tensors'
    forward does: dynamic scales from each token's (tensor's, group's) range including 0."""
    lo, hi = (-FP8_MAX, FP8_MAX) if a.type == "float" else (
        -(1 << (a.num_bits - 1)), (1 << (a.num_bits - 1)) - 1)
    shape = x.shape
    if a.strategy == "group":  # K % group_size == 0: checked when the layer is built
        x = x.unflatten(-1, (-1, a.group_size))
    if a.dynamic:
        v = x.reshape(1, -1) if a.strategy == "tensor" else x  # ranges include 0
        mn, mx = v.amin(-1, keepdim=True).clamp(max=0), v.amax(-1, keepdim=True).clamp(min=0)
        scale = torch.maximum(-mn, mx) / ((hi - lo) / 2) if a.symmetric else (mx - mn) / (hi - lo)
        scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
        zero = None if a.symmetric else torch.round((lo - mn / scale).clamp(lo, hi))
    else:
        scale = scale.to(x.dtype)
        zero = None if zero is None else zero.to(x.dtype)
    y = (x / scale if zero is None else x / scale + zero).clamp(lo, hi)
    y = y.to(torch.float8_e4m3fn).to(x.dtype) if a.type == "float" else torch.round(y)
    return ((y if zero is None else y - zero) * scale).reshape(shape)


class ActQuantKernel(ReferenceKernel):
    """The library's W8A8 forward: fake-quantized activations times dequantized weights."""

    name = "activation fake-quant + dequantize + F.linear (torch reference)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer, a = self.layer, self.method.scheme.acts
        shared = fake_quant(x, a) if a.dynamic else None
        outs = []
        for raw, rows in zip(layer.raw_shards, layer.output_sizes):
            xq = shared if shared is not None else fake_quant(
                x, a, raw["input_scale"], raw.get("input_zero_point"))
            w = self.method.reference(raw, rows, layer.input_size, layer.prefix)
            outs.append(F.linear(xq, w.to(device=x.device, dtype=x.dtype)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class CTFp8ScaledMM(Fp8ScaledMMKernel):
    """FP8 W8A8 on torch._scaled_mm: the fp8 method's kernel, fed with this format's scales."""

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        w, a = method.scheme.weights, method.scheme.acts
        if w.type != "float" or w.strategy not in ("tensor", "channel") or a.type != "float" \
                or not a.symmetric or a.strategy != ("token" if a.dynamic else "tensor"):
            return False, (f"{w.strategy} weight scales with {a.strategy} activation scales "
                           f"(takes FP8 per-tensor/channel weights, per-token activations)")
        # The rest (CUDA sm89+, fp16/bf16, K and N multiples of 16) as for fp8 checkpoints.
        return super().can_implement(SimpleNamespace(p=SimpleNamespace(scheme=w.strategy)),
                                     layer, device, policy)

    def __init__(self, method, layer, device) -> None:
        raws = list(zip(layer.raw_shards, layer.output_sizes))
        self.w_t = torch.cat([raw["weight"] for raw, _ in raws]).to(device).t()
        self.w_scale = torch.cat([raw["weight_scale"].float().reshape(-1).expand(rows)
                                  for raw, rows in raws]).reshape(1, -1).to(device)
        self.in_scale = None if method.scheme.acts.dynamic else torch.stack(
            [raw["input_scale"].float().reshape(()) for raw, _ in raws]).max().to(device)
        self.ub = None


class CTFp8Triton(Fp8TritonKernel):
    """FP8 weight-only (float-quantized weights, no input activations) on the fused Triton
    kernel; group scales [N, K/g] are its block scales of 1 x g."""

    @staticmethod
    def scale_block(method) -> tuple[int, int] | None:
        w = method.scheme.weights
        return {"block": w.block_structure, "group": (1, w.group_size)}.get(w.strategy)

    @staticmethod
    def shard_scale(method, raw: dict) -> torch.Tensor:
        return raw["weight_scale"].float()

    @classmethod
    def can_implement(cls, method, layer, device, policy):
        w = method.scheme.weights
        if w.type != "float" or method.scheme.acts is not None:
            return False, "takes FP8 weights with 16-bit activations (no input_activations)"
        if any("weight_g_idx" in raw for raw in layer.raw_shards):
            return False, "act-order groups (weight_g_idx)"
        return super().can_implement(method, layer, device, policy)


class CTLinearMethod(PackedLinearMethod):
    def __init__(self, scheme: Scheme, policy: str) -> None:
        super().__init__(policy)
        self.scheme = scheme
        self.label = scheme.label()

    def kernels(self):
        if self.scheme.acts is not None:
            return (CTFp8ScaledMM, ActQuantKernel)
        return INT_KERNELS if self.scheme.weights.type == "int" else (CTFp8Triton,
                                                                      ReferenceKernel)

    def specs(self, rows: int, cols: int) -> dict[str, TensorSpec]:
        s, w = self.scheme, self.scheme.weights
        if s.acts is not None and s.acts.strategy == "group" and cols % s.acts.group_size:
            raise UnsupportedError(f"'{s.acts.key}': K={cols} is not a multiple of the "
                                   f"activation group size {s.acts.group_size}")
        sshape = _scale_shape(w, rows, cols)
        axes = _scale_axes(w)
        out = {"weight_scale": TensorSpec(sshape, FLOATS, why=f"{w.strategy} scales of "
                                                                f"N={rows} x K={cols}", **axes)}
        if s.format == "pack-quantized":
            width = packed_length(cols, w.num_bits, s.dense)
            out["weight_packed"] = TensorSpec((rows, width), (torch.int32,),
                                              why=f"K={cols} {w.num_bits}-bit values per row")
            out["weight_shape"] = TensorSpec((2,), (torch.int32, torch.int64), why="(N, K)")
            if not w.symmetric and w.strategy != "tensor":
                out["weight_zero_point"] = TensorSpec(
                    (packed_length(rows, w.num_bits, s.dense), sshape[1]), (torch.int32,),
                    why=f"N={rows} {w.num_bits}-bit zero points packed along N per group")
        else:
            dtype = torch.float8_e4m3fn if w.type == "float" else torch.int8
            out["weight"] = TensorSpec((rows, cols), (dtype,), why=f"N={rows} x K={cols}",
                                       n=(0, 1), k=(1, 1))
        if not w.symmetric and (s.format != "pack-quantized" or w.strategy == "tensor"):
            out["weight_zero_point"] = TensorSpec(sshape, INTS, why="one per scale", **axes)
        if w.strategy == "group":
            out["weight_g_idx"] = TensorSpec((cols,), (torch.int32, torch.int64), required=False,
                                             why=f"the group of each of the K={cols} columns",
                                             k=(0, 1))
        if s.acts is not None and not s.acts.dynamic:
            out["input_scale"] = TensorSpec((1,), FLOATS, why="static activation scale")
            if not s.acts.symmetric:
                out["input_zero_point"] = TensorSpec((1,), INTS, why="static activation zero")
        return out

    def load_weight(self, layer: nn.Module, name: str, tensor: Any, shard: int) -> None:
        rows, cols = layer.output_sizes[shard], layer.input_size
        spec = self.specs(rows, cols).get(name)
        if isinstance(tensor, torch.Tensor) and spec is not None and spec.shape == (1,) \
                and tensor.numel() == 1:
            tensor = tensor.reshape(1)  # one scale is written as [], [1] or [1, 1]
        if name == "weight_shape" and isinstance(tensor, torch.Tensor) and tensor.numel() == 2 \
                and tuple(tensor.tolist()) != (rows, cols):
            raise FormatError(f"tensor {layer.shard_prefixes[shard]}.weight_shape says "
                              f"{tuple(tensor.tolist())} but the layer is [N={rows}, K={cols}]",
                              hint="the checkpoint does not match its config.json")
        super().load_weight(layer, name, tensor, shard)

    def tp_cuts_ints(self, layer: nn.Module) -> bool:
        # W8A8 kernels quantize activations from the stored tensors
        return self.scheme.acts is None and super().tp_cuts_ints(layer)

    def _signed(self, t: dict[str, torch.Tensor], rows: int, cols: int):
        """(q signed [N, K], scale [N, G], zero signed [N, G] or None, g_idx) of an int layer."""
        s, w = self.scheme, self.scheme.weights
        scale = t["weight_scale"].reshape(rows, -1) if w.strategy != "tensor" else \
            t["weight_scale"].reshape(1, 1).expand(rows, 1)
        zp = t.get("weight_zero_point")
        if s.format == "pack-quantized":
            packed_zp = zp if w.strategy != "tensor" else None
            q, _, zp2, g_idx = ct_format.unpack_packed(
                t["weight_packed"], scale, t["weight_shape"], w.num_bits, packed_zp,
                t.get("weight_g_idx"), dense=s.dense)
            zp = zp2 if packed_zp is not None else zp
        else:
            q, g_idx = t["weight"].to(torch.int32), t.get("weight_g_idx")
        if zp is not None:
            zp = zp.to(torch.int32).reshape(1, 1).expand_as(scale) if zp.numel() == 1 else zp
        return q, scale, zp, g_idx

    def reference(self, t, rows, cols, where):
        w = self.scheme.weights
        if w.type == "float":
            return ct_format.dequantize_float(t["weight"], t["weight_scale"].float(),
                                              block_structure=w.block_structure, dtype=F32)
        q, scale, zp, g_idx = self._signed(t, rows, cols)
        return ct_format.dequantize_unpacked(q, scale.float(), zp, g_idx, dtype=F32,
                                             group_size=w.group_size or cols)

    def to_int(self, t, rows, cols, where):
        w = self.scheme.weights
        if w.type == "float":
            return None
        q, scale, zp, g_idx = self._signed(t, rows, cols)
        half = 1 << (w.num_bits - 1)  # signed values are stored offset by 2**(b-1)
        zeros = torch.full(scale.shape, half, dtype=torch.int32) if zp is None else zp + half
        return IntWeight((q + half).t(), scale.t(), zeros.t(),
                         None if g_idx is None else g_idx.to(torch.int32), w.group_size or cols,
                         w.num_bits)


def _matches(name: str, target: str) -> bool:
    """Whether a target (exact name, ``re:`` regex, class name Linear) names a linear layer."""
    return (re.match(target[3:], name) is not None if target.startswith("re:")
            else target in (name, "Linear"))


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"
    aliases = ("compressed_tensors",)

    def __init__(self, targets: dict[str, tuple[str, Scheme]], ignore: tuple[str, ...],
                 fmt: str | None, version: str | None, policy: str = "auto") -> None:
        self.targets = targets     # target -> (group name, scheme); later groups win
        self.ignore = ignore
        self.format = fmt
        self.version = version
        self.policy = policy

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CompressedTensorsConfig":
        for key, what in (("sparsity_config", "sparse (2:4 / bitmask) weights"),
                          ("transform_config", "rotation transforms (SpinQuant / QuIP)"),
                          ("kv_cache_scheme", "a quantized KV cache")):
            if config.get(key):
                raise UnsupportedError(f"compressed-tensors '{key}': {what} are not supported")
        groups = config.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ConfigError("compressed-tensors settings have no 'config_groups'")
        ignore = config.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise ConfigError("quantization setting 'ignore' must be a list of names")
        fmt, version = config.get("format"), config.get("version")
        dense = not version or tuple(map(int, re.findall(r"\d+", str(version))[:2])) >= (0, 19)
        targets: dict[str, tuple[str, Scheme]] = {}
        for gname, g in groups.items():
            key = f"config_groups.{gname}"
            if not isinstance(g, dict):
                raise ConfigError(f"quantization setting {key!r} must be an object")
            if g.get("output_activations") or not g.get("weights"):
                raise UnsupportedError(f"'{key}': only weight (and input activation) "
                                       f"quantization is supported")
            tg = g.get("targets")
            if not isinstance(tg, list) or not tg or not all(isinstance(t, str) for t in tg):
                raise ConfigError(f"quantization setting '{key}.targets' must be a non-empty "
                                  f"list of names, 're:' regexes or class names")
            acts = g.get("input_activations")
            scheme = Scheme(QuantArgs.parse(g["weights"], f"{key}.weights", True),
                            None if acts is None else
                            QuantArgs.parse(acts, f"{key}.input_activations", False),
                            g.get("format") or fmt or "", dense)
            for t in tg:
                targets[t] = (gname, scheme)
        for t in (t for t in [*targets, *ignore] if t.startswith("re:")):
            try:
                re.compile(t[3:])
            except re.error as exc:
                raise ConfigError(f"target {t!r} is not a valid regex: {exc}") from None
        return cls(targets, tuple(ignore), fmt, version)

    def scheme_for(self, name: str) -> Scheme | None:
        if any(_matches(name, i) for i in self.ignore):
            return None
        for t in sorted(self.targets, key=lambda t: (t == "Linear", t.startswith("re:"), t)):
            if _matches(name, t):
                return self.targets[t][1]
        return None

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | EmbeddingMethod:
        from quantrt.models.layers import VocabEmbedding

        if isinstance(layer, VocabEmbedding):
            return UnquantizedEmbeddingMethod()
        if not is_quantized(layer, lambda n: self.scheme_for(n) is not None):
            return UnquantizedLinearMethod()
        schemes = {self.scheme_for(n) for n in layer.shard_prefixes}
        if len(schemes) > 1:
            raise UnsupportedError(f"config_groups give the modules fused into {prefix} "
                                   f"different schemes", hint="fused q/k/v and gate/up layers "
                                                              "must share one scheme")
        return CTLinearMethod(schemes.pop(), self.policy)

    def settings(self) -> dict[str, Any]:
        groups: dict[str, Any] = {}
        for target, (gname, s) in self.targets.items():
            groups.setdefault(gname, {"targets": [], "format": s.format,
                                      "weights": s.weights.as_dict(), "input_activations":
                                      s.acts and s.acts.as_dict()})["targets"].append(target)
        return {"format": self.format, "config_groups": groups, "ignore": list(self.ignore),
                "version": self.version}
