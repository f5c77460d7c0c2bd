"""FP8 (float8_e4m3fn) weight checkpoints, and online FP8 quantization.

* ``fp8`` (transformers FineGrainedFP8 / vLLM Fp8): ``weight_block_size [bn, bk]`` -> block
  scales ``weight_scale_inv [ceil(N/bn), ceil(K/bk)]``; without it one scale per tensor,
  named ``weight_scale`` (vLLM, AutoFP8) or ``weight_scale_inv`` (transformers, [1, 1]);
  ``activation_scheme: static`` adds a per-tensor ``input_scale``.
* ``fbgemm-fp8``: per-channel ``weight_scale [N, 1]``, dynamic per-token activations bounded
  by ``activation_scale_ub``.
* ``modelopt`` (NVIDIA ModelOpt, ``quant_algo: FP8``): per-tensor ``weight_scale`` and static
  ``input_scale``; ``exclude_modules``.
* ``--quantization fp8`` on an unquantized checkpoint: per-tensor scales, computed per
  checkpoint tensor while loading (vLLM's online FP8).

Fused q/k/v and gate/up keep each shard's own scale (no requantization to the largest one,
so no extra rounding); the kernels expand them to one scale per output row.  KV-cache
scales (``k_scale``, ``v_scale``) are accepted and unused: the KV cache stays in the model
dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from formats import fp8 as fp8_format
from quantrt.errors import ConfigError, FormatError, UnsupportedError
from quantrt.quant.base import EmbeddingMethod, LinearMethod, QuantConfig, config_get, is_quantized
from quantrt.quant.bnb import check_float_weight, check_skip_list, matches_any, shard_name
from quantrt.quant.packed import PackedLinearMethod, TensorSpec
from quantrt.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# transformers' scale_fmt "ue8m0" stores block scales as powers of two in one byte.
SCALE_DTYPES = FLOATS + ((torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else ())
SCHEMES = ("tensor", "channel", "block")
ACTIVATIONS = ("dynamic", "static")
SCALARS = ("weight_scale", "weight_scale_inv", "input_scale", "k_scale", "v_scale")


@dataclass(frozen=True)
class Fp8Params:
    scheme: str                             # tensor | channel | block
    activation: str = "dynamic"             # dynamic (per token) | static (input_scale)
    block: tuple[int, int] | None = None    # (bn, bk) for the block scheme
    activation_ub: float | None = None      # fbgemm: bound on per-token activation scales

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"FP8 weight scale scheme {self.scheme!r} (one of {SCHEMES})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"quantization setting 'activation_scheme' = {self.activation!r} "
                              "is not supported", hint="expected dynamic or static")
        if (self.scheme == "block") != (self.block is not None):
            raise ConfigError("FP8 block scales need weight_block_size, and only they use it")
        if self.scheme == "block" and self.activation == "static":
            raise UnsupportedError("FP8 with block-wise weight scales and static activation "
                                   "scales is not supported", hint="block-wise FP8 "
                                   "checkpoints use activation_scheme: dynamic")

    def label(self) -> str:
        scales = {"tensor": "per-tensor", "channel": "per-channel",
                  "block": f"block {self.block[0]}x{self.block[1]}" if self.block else ""}
        return f"fp8 e4m3 {scales[self.scheme]}"


class Fp8LinearMethod(PackedLinearMethod):
    """``online``: the checkpoint holds float weights, quantized per tensor here."""

    def __init__(self, params: Fp8Params, policy: str, online: bool = False) -> None:
        super().__init__(policy)
        self.p = params
        self.online = online
        self.label = params.label()

    def kernels(self):
        from quantrt.quant.fp8_kernels import FP8_KERNELS

        return FP8_KERNELS

    def specs(self, rows: int, cols: int) -> dict[str, TensorSpec]:
        p = self.p
        specs = {"weight": TensorSpec((rows, cols), (torch.float8_e4m3fn,),
                                      why=f"N={rows} x K={cols} float8_e4m3fn",
                                      n=(0, 1), k=(1, 1))}
        if p.scheme == "block":
            bn, bk = p.block
            specs["weight_scale_inv"] = TensorSpec(
                (-(-rows // bn), -(-cols // bk)), SCALE_DTYPES,
                why=f"one per {bn}x{bk} block of N={rows} x K={cols}, edge blocks partial",
                n=(0, bn), k=(1, bk))
        elif p.scheme == "channel":
            specs["weight_scale"] = TensorSpec((rows, 1), FLOATS, why=f"one per row, N={rows}",
                                               n=(0, 1))
        else:
            # Either name (checked in process_weights_after_loading): vLLM / transformers.
            for name in ("weight_scale", "weight_scale_inv"):
                specs[name] = TensorSpec((1,), FLOATS, required=False, why="one per tensor")
        specs["input_scale"] = TensorSpec((1,), FLOATS, required=p.activation == "static",
                                          why="static activation scale, one per tensor")
        for name in ("k_scale", "v_scale"):
            specs[name] = TensorSpec((1,), FLOATS, required=False, why="KV-cache scale (unused)")
        return specs

    def create_weights(self, layer, input_size, output_sizes, params_dtype) -> None:
        super().create_weights(layer, input_size, output_sizes, params_dtype)
        if self.online:
            layer.tracker.expected = {("weight", s) for s in range(len(output_sizes))}

    def load_weight(self, layer: nn.Module, name: str, tensor: Any, shard: int) -> None:
        if self.online:
            self._quantize(layer, name, tensor, shard)
            return
        if isinstance(tensor, torch.Tensor):
            # Scalars are written as [], [1] or [1, 1]; per-channel scales as [N] or [N, 1].
            block_scale = self.p.scheme == "block" and name == "weight_scale_inv"
            if name in SCALARS and tensor.numel() == 1 and not block_scale:
                tensor = tensor.reshape(1)
            elif name == "weight_scale" and self.p.scheme == "channel" and tensor.dim() == 1:
                tensor = tensor.reshape(-1, 1)
        super().load_weight(layer, name, tensor, shard)

    def _quantize(self, layer, name: str, tensor: Any, shard: int) -> None:
        where = shard_name(layer, shard, name)
        rows = layer.output_sizes[shard]
        if name != "weight":
            raise FormatError(f"unexpected tensor {where}: online FP8 quantization reads plain "
                              "float weights", hint="is the checkpoint quantized?")
        check_float_weight(tensor, rows, layer.input_size, where)
        q, scale = fp8_format.quantize(tensor, "tensor")
        super().load_weight(layer, "weight", q, shard)
        super().load_weight(layer, "weight_scale", scale, shard)

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        for shard, raw in enumerate(layer.raw_shards):
            if self.p.scheme == "tensor":
                names = [n for n in ("weight_scale", "weight_scale_inv") if n in raw]
                if len(names) != 1:
                    first = shard_name(layer, shard, "weight_scale")
                    raise FormatError(
                        f"checkpoint lacks tensor {first}" if not names else
                        f"both {first} and weight_scale_inv are present; which one applies is "
                        "ambiguous", hint="per-tensor FP8 layers hold weight_scale (vLLM) or "
                                          "weight_scale_inv (transformers)")
            for name, t in raw.items():
                if name != "weight" and not torch.isfinite(t.float()).all():
                    raise FormatError(f"tensor {shard_name(layer, shard, name)} holds "
                                      "non-finite scales")
        super().process_weights_after_loading(layer, device)

    @staticmethod
    def weight_scale(t: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = t.get("weight_scale_inv", t.get("weight_scale"))
        return scale.float()

    def reference(self, t, rows, cols, where):
        block = self.p.block if self.p.scheme == "block" else None
        return fp8_format.dequantize(t["weight"], self.weight_scale(t), block_size=block,
                                     dtype=torch.float32)

    def tie_to(self, layer, embedding) -> None:
        raise UnsupportedError("lm_head is tied to the embeddings but the FP8 settings ask to "
                               "quantize it", hint="add lm_head to modules_to_not_convert")


class _Fp8Family(QuantConfig):
    """Shared by the three FP8 producers: they differ in settings, not in the layer."""

    online: ClassVar[bool] = False

    def __init__(self, params: Fp8Params, skip: tuple[str, ...] | None = None,
                 extra: dict[str, Any] | None = None, online: bool = False,
                 policy: str = "auto") -> None:
        self.params = params
        # transformers keeps the output embedding in float unless a skip list is given.
        self.skip = ("lm_head",) if skip is None else skip
        self.extra = extra or {}
        self.is_online = online
        self.policy = policy

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | EmbeddingMethod:
        from quantrt.models.layers import VocabEmbedding

        if isinstance(layer, VocabEmbedding):
            return UnquantizedEmbeddingMethod()
        if not is_quantized(layer, lambda n: not matches_any(n, self.skip)):
            return UnquantizedLinearMethod()
        return Fp8LinearMethod(self.params, self.policy, online=self.is_online)

    def settings(self) -> dict[str, Any]:
        p = self.params
        out: dict[str, Any] = {"weight_scales": {"tensor": "per-tensor", "channel": "per-channel",
                                                 "block": "block"}[p.scheme]}
        if p.block is not None:
            out["weight_block_size"] = list(p.block)
        out["activation_scheme"] = p.activation
        out.update(self.extra)
        out["skip_modules"] = list(self.skip)
        out["online"] = self.is_online
        return out


def _activation(config: dict[str, Any]) -> str:
    scheme = config_get(config, "activation_scheme", default="dynamic")
    if not isinstance(scheme, str) or scheme.lower() not in ACTIVATIONS:
        raise ConfigError(f"quantization setting 'activation_scheme' = {scheme!r} is not "
                          "supported", hint="expected dynamic or static")
    return scheme.lower()


class Fp8Config(_Fp8Family):
    name = "fp8"
    online: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Fp8Config":
        block = config.get("weight_block_size")
        if block is not None:
            if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(
                    type(b) is int and b > 0 for b in block):
                raise ConfigError("quantization setting 'weight_block_size' must be two "
                                  f"positive integers, got {block!r}")
            block = tuple(block)
        fmt = config_get(config, "scale_fmt", default="float")
        if fmt not in ("float", "ue8m0"):
            raise ConfigError(f"quantization setting 'scale_fmt' = {fmt!r} is not supported",
                              hint="expected float or ue8m0")
        if config.get("modules_to_convert"):
            raise UnsupportedError("FP8 embedding tables ('modules_to_convert') are not "
                                   "supported")
        # MiniMax and vLLM name the skip list ignored_layers.
        key = "modules_to_not_convert" if config.get("modules_to_not_convert") is not None \
            else "ignored_layers"
        skip = check_skip_list(config.get(key), key)
        params = Fp8Params("block" if block else "tensor", _activation(config), block)
        return cls(params, skip)

    @classmethod
    def for_online(cls, name: str) -> "Fp8Config":
        """``--quantization fp8`` on an unquantized checkpoint: per-tensor weight scales,
        dynamic activations, lm_head and embeddings left as they are."""
        return cls(Fp8Params("tensor"), online=True)


class FbgemmFp8Config(_Fp8Family):
    name = "fbgemm-fp8"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FbgemmFp8Config":
        ub = config_get(config, "activation_scale_ub", default=1200.0)
        if isinstance(ub, bool) or not isinstance(ub, (int, float)) or not ub > 0 \
                or ub == float("inf"):
            raise ConfigError("quantization setting 'activation_scale_ub' must be a positive "
                              f"number, got {ub!r}")
        skip = check_skip_list(config.get("modules_to_not_convert"), "modules_to_not_convert")
        params = Fp8Params("channel", "dynamic", activation_ub=float(ub))
        return cls(params, skip, {"activation_scale_ub": float(ub)})


class ModelOptFp8Config(_Fp8Family):
    name = "modelopt"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelOptFp8Config":
        if isinstance(config.get("quantization"), dict):  # hf_quant_config.json nesting
            config = {**config, **config["quantization"]}
        algo = config_get(config, "quant_algo")
        if not isinstance(algo, str):
            raise ConfigError(f"ModelOpt setting 'quant_algo' must be a string, got {algo!r}")
        if algo.upper() != "FP8":
            raise UnsupportedError(f"ModelOpt quant_algo {algo!r} is not supported",
                                   hint="quantrt reads ModelOpt FP8 (per-tensor) checkpoints")
        kv = config.get("kv_cache_quant_algo")
        if kv is not None and not isinstance(kv, str):
            raise ConfigError(f"ModelOpt setting 'kv_cache_quant_algo' = {kv!r} is not a string")
        key = "exclude_modules" if config.get("exclude_modules") is not None else "ignore"
        skip = check_skip_list(config.get(key), key)
        # kv_cache_quant_algo FP8 writes k/v scales; the KV cache stays in the model dtype.
        return cls(Fp8Params("tensor", "static"), skip,
                   {"quant_algo": "FP8", "kv_cache_quant_algo": kv})
