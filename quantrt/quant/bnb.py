"""bitsandbytes checkpoints as transformers saves them, and online NF4 quantization.

* 4-bit (``load_in_4bit``, NF4 or FP4, optionally double-quantized absmax): the packed codes
  stay packed; the per-layer ``quant_state`` JSON (block size, shape, dtype) is checked
  against the layer at load.  Kernels: a code-book lookup path (lut_kernels.py), the
  reference as the oracle.
* 8-bit (``load_in_8bit``, LLM.int8 weights ``weight`` int8 + ``SCB`` row absmax): an
  integer-affine format (``to_int``: unsigned q + 128, per-row scale SCB/127, zero 128), so
  the integer GPU kernel runs it; on the CPU torch's int8 weight-only GEMM.  Activations
  are not quantized: bitsandbytes' LLM.int8 forward also quantizes activations (outlier
  columns above ``llm_int8_threshold`` kept in float16), which is an approximation of the
  weight-only product computed here.
* ``--quantization bitsandbytes`` on an unquantized checkpoint quantizes every linear to NF4
  (double quant, block 64) while loading.

Module skipping follows transformers: ``llm_int8_skip_modules`` if given, else lm_head.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from formats import bnb as bnb_format
from quantrt.errors import ConfigError, FormatError, UnsupportedError
from quantrt.parallel.plan import lcm
from quantrt.quant.base import (EmbeddingMethod, LinearMethod, QuantConfig, check_bool,
                                config_get, is_quantized)
from quantrt.quant.packed import IntWeight, PackedLinearMethod, TensorSpec
from quantrt.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# bnb_4bit_quant_storage: the packed bytes viewed as another dtype (FSDP-friendly storage).
STORAGE = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
           "int32": torch.int32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float32": torch.float32}
BLOCKSIZE = 64          # bitsandbytes' default (the config does not record it; quant_state does)
ONLINE_BLOCKSIZE = 64
# bitsandbytes' Int8Params.weight_format codes; only 0 (row-major) is a plain [N, K] matrix.
INT8_LAYOUTS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether module ``name`` is named by a skip list.  Producers write these lists in three
    dialects, and a module either library skips was saved unquantized, so any of them counts:
    a regex matching from the start up to a module boundary ("model.layers.1" but not
    "model.layers.11"), a plain suffix ("down_proj", "lm_head"), a whole dotted component
    ("visual"), or a shell wildcard (ModelOpt's "model.layers.*.mlp*")."""
    for p in patterns:
        if not p:
            continue  # an empty entry would match everything by suffix
        if name.endswith(p) or p in name.split(".") or fnmatch.fnmatchcase(name, p):
            return True
        try:
            if re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", name):
                return True
        except re.error:
            continue  # not a regex ("*lm_head"): the literal and wildcard tests above apply
    return False


def check_skip_list(value: Any, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise ConfigError(f"quantization setting {key!r} must be a list of module names, "
                          f"got {value!r}")
    return tuple(value)


def shard_name(layer: nn.Module, shard: int, tensor: str) -> str:
    """The checkpoint's own name of a tensor of one shard (k_proj, not qkv_proj shard 1)."""
    prefixes = getattr(layer, "shard_prefixes", None) or [layer.prefix]
    return f"{prefixes[shard]}.{tensor}"


def _describe(t: Any) -> str:
    if isinstance(t, torch.dtype):
        return str(t).removeprefix("torch.")
    if isinstance(t, torch.Tensor):
        return f"{_describe(t.dtype)} {list(t.shape)}"
    return type(t).__name__


def check_float_weight(tensor: Any, rows: int, cols: int, where: str) -> None:
    """What online quantization reads: a plain float [rows, cols] weight."""
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point \
            or tuple(tensor.shape) != (rows, cols):
        raise FormatError(f"tensor {where} is {_describe(tensor)}, expected a float "
                          f"[{rows}, {cols}] weight")


def _check_choice(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"quantization setting {key!r} = {value!r} is not supported",
                          hint=f"expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class BnbParams:
    bits: int                       # 4 or 8
    quant_type: str = "nf4"         # 4-bit code book
    double_quant: bool = False      # absmax itself 8-bit quantized
    compute_dtype: str = "float32"  # what bitsandbytes would compute in (reported only)
    quant_storage: str = "uint8"
    threshold: float = 6.0          # LLM.int8 outlier threshold (reported only: weight-only here)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"bitsandbytes: {self.bits}-bit weights (4 or 8)")
        _check_choice(self.quant_type, "bnb_4bit_quant_type", QUANT_TYPES)
        check_bool(self.double_quant, "bnb_4bit_use_double_quant")
        _check_choice(self.compute_dtype, "bnb_4bit_compute_dtype", COMPUTE_DTYPES)
        _check_choice(self.quant_storage, "bnb_4bit_quant_storage", tuple(STORAGE))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold):
            raise ConfigError("quantization setting 'llm_int8_threshold' must be a number, "
                              f"got {self.threshold!r}")

    def label(self) -> str:
        if self.bits == 8:
            return "bnb int8 (row absmax, weight-only)"
        return f"bnb {self.quant_type}{' double-quant' if self.double_quant else ''}"


class Bnb4bitLinearMethod(PackedLinearMethod):
    """NF4/FP4 layers.  ``online``: the checkpoint holds float weights, quantized here."""

    _SIZED = ("weight.absmax", "weight.nested_absmax")  # lengths follow the quant_state

    def __init__(self, params: BnbParams, policy: str, online: bool = False) -> None:
        super().__init__(policy)
        self.p = params
        self.online = online
        self.state_key = f"weight.{bnb_format.quant_state_key(params.quant_type)}"
        self.label = params.label()

    def kernels(self):
        from quantrt.quant.lut_kernels import LUT4_KERNELS

        return LUT4_KERNELS

    def specs(self, rows: int, cols: int, blocksize: int = BLOCKSIZE,
              nested_blocksize: int = 256) -> dict[str, TensorSpec]:
        storage = STORAGE[self.p.quant_storage]
        n = rows * cols
        nb = -(-n // blocksize)
        shape = f"the flattened N={rows} x K={cols} weight"
        specs = {
            "weight": TensorSpec(((n + 1) // (2 * storage.itemsize), 1), (storage,),
                                 why=f"{n} 4-bit codes, two per byte, as {self.p.quant_storage}"),
            "weight.absmax": TensorSpec(
                (nb,), (torch.uint8,) if self.p.double_quant else (torch.float32,),
                why=f"one per {blocksize} values of {shape}"
                    + (", 8-bit codes (double quant)" if self.p.double_quant else "")),
            "weight.quant_map": TensorSpec((16,), (torch.float32,), required=False,
                                           why="the 16 code values"),
            self.state_key: TensorSpec((-1,), (torch.uint8,), why="JSON bytes"),
        }
        if self.p.double_quant:
            specs["weight.nested_absmax"] = TensorSpec(
                (-(-nb // nested_blocksize),), (torch.float32,),
                why=f"one per {nested_blocksize} of the {nb} absmax codes")
            specs["weight.nested_quant_map"] = TensorSpec((256,), (torch.float32,),
                                                          why="the 8-bit absmax code")
        return specs

    def create_weights(self, layer, input_size, output_sizes, params_dtype) -> None:
        super().create_weights(layer, input_size, output_sizes, params_dtype)
        layer.bnb_meta = [None] * len(output_sizes)
        if self.online:
            layer.tracker.expected = {("weight", s) for s in range(len(output_sizes))}

    def load_weight(self, layer: nn.Module, name: str, tensor: Any, shard: int) -> None:
        if self.online:
            self._quantize(layer, name, tensor, shard)
            return
        self._load_packed(layer, name, tensor, shard)

    def _load_packed(self, layer, name, tensor, shard) -> None:
        where = shard_name(layer, shard, name)
        spec = self.specs(layer.output_sizes[shard], layer.input_size).get(name)
        if name == self.state_key or (spec is not None and name in self._SIZED):
            # Lengths are checked once the quant_state (which may come later) is known.
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 \
                    or tensor.dtype not in spec.dtypes:
                raise FormatError(f"tensor {where} is {_describe(tensor)}, expected a 1-D "
                                  f"{_describe(spec.dtypes[0])} tensor ({spec.why})")
            if name == self.state_key:
                layer.bnb_meta[shard] = self._parse_state(layer, shard, tensor)
            layer.raw_shards[shard][name] = tensor
            layer.tracker.mark(name, shard)
            return
        super().load_weight(layer, name, tensor, shard)

    def _parse_state(self, layer, shard: int, blob: torch.Tensor) -> dict:
        where = shard_name(layer, shard, self.state_key)
        rows, cols = layer.output_sizes[shard], layer.input_size
        try:
            meta = bnb_format.parse_quant_state(blob)
        except FormatError as exc:
            raise FormatError(f"tensor {where}: {exc.message}") from None
        if meta["quant_type"] != self.p.quant_type:
            raise FormatError(f"tensor {where} describes {meta['quant_type']} codes, but "
                              f"bnb_4bit_quant_type is {self.p.quant_type}")
        shape = meta["shape"]
        if not isinstance(shape, list) or [s if type(s) is int else None for s in shape] \
                != [rows, cols]:
            raise FormatError(f"tensor {where} gives the weight shape {shape}, but "
                              f"{shard_name(layer, shard, 'weight')} is [{rows}, {cols}]",
                              hint="the checkpoint does not match its config.json")
        for key in ("blocksize", *(("nested_blocksize",) if "nested_blocksize" in meta else ())):
            if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 1:
                raise FormatError(f"tensor {where}: {key} {meta[key]!r} is not a positive integer")
        if meta["dtype"] not in ("float16", "bfloat16", "float32"):
            raise FormatError(f"tensor {where}: unknown weight dtype {meta['dtype']!r}")
        nested = "nested_offset" in meta
        if nested != self.p.double_quant:
            raise FormatError(f"tensor {where} {'has' if nested else 'lacks'} double-quant "
                              f"fields, but bnb_4bit_use_double_quant is "
                              f"{str(self.p.double_quant).lower()}")
        return meta

    def _validate(self, layer, shard: int) -> None:
        """Tensor lengths against the shard's quant_state (its block sizes may differ from
        bitsandbytes' default, so this waits until every tensor has arrived)."""
        meta = layer.bnb_meta[shard]
        raw = layer.raw_shards[shard]
        specs = self.specs(layer.output_sizes[shard], layer.input_size, meta["blocksize"],
                           meta.get("nested_blocksize", 256))
        for name in self._SIZED:
            if name in raw and tuple(raw[name].shape) != specs[name].shape:
                raise FormatError(
                    f"tensor {shard_name(layer, shard, name)} has {raw[name].numel()} entries, "
                    f"expected {specs[name].shape[0]} ({specs[name].why}, block sizes from "
                    f"{shard_name(layer, shard, self.state_key)})")
        if not torch.isfinite(bnb_format.dequantize_absmax(
                raw["weight.absmax"], raw.get("weight.nested_absmax"),
                raw.get("weight.nested_quant_map"), meta.get("nested_offset"),
                meta.get("nested_blocksize", 256))).all():
            raise FormatError(f"tensor {shard_name(layer, shard, 'weight.absmax')} holds "
                              "non-finite scales")

    def _quantize(self, layer, name: str, tensor: Any, shard: int) -> None:
        where = shard_name(layer, shard, name)
        rows = layer.output_sizes[shard]
        if name != "weight":
            raise FormatError(f"unexpected tensor {where}: online bitsandbytes quantization "
                              "reads plain float weights", hint="is the checkpoint quantized?")
        check_float_weight(tensor, rows, layer.input_size, where)
        packed = bnb_format.quantize_4bit(tensor, self.p.quant_type, ONLINE_BLOCKSIZE,
                                          self.p.double_quant,
                                          storage=STORAGE[self.p.quant_storage])
        for key, value in packed.items():
            self._load_packed(layer, key, value, shard)

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        for shard in range(len(layer.output_sizes)):
            self._validate(layer, shard)
        super().process_weights_after_loading(layer, device)

    # -- tensor parallelism: the codes are one flat row-major run over [N, K] ----------
    def tp_units(self, layer: nn.Module) -> tuple[int, int]:
        n_units, k_units = [], []
        for meta in layer.bnb_meta:
            bs, cols = int(meta["blocksize"]), layer.input_size
            if cols % bs == 0:   # blocks never straddle rows: cut anywhere between blocks
                n_units.append(1)
                k_units.append(bs)
            else:                # whole rows only, at block boundaries; columns stay whole
                n_units.append(bs // math.gcd(cols, bs))
                k_units.append(cols)
        return lcm(*n_units), lcm(*k_units)

    def shard(self, layer: nn.Module, rows, cols) -> None:
        """Cut the codes and the (fp32, double quant undone) absmax, and rewrite the
        quant_state for the new shape."""
        k = layer.input_size
        for i, (raw, meta) in enumerate(zip(layer.raw_shards, layer.bnb_meta)):
            n, bs = layer.output_sizes[i], int(meta["blocksize"])
            store = raw["weight"]
            codes = store.contiguous().reshape(-1).view(torch.uint8)
            absmax = bnb_format.dequantize_absmax(
                raw["weight.absmax"], raw.get("weight.nested_absmax"),
                raw.get("weight.nested_quant_map"), meta.get("nested_offset"),
                int(meta.get("nested_blocksize", 256)))
            shape = [n, k]
            if rows is not None:
                codes = torch.cat([codes[a * k // 2:-(-b * k // 2)] for a, b in rows[i]])
                absmax = torch.cat([absmax[a * k // bs:-(-b * k // bs)] for a, b in rows[i]])
                shape[0] = sum(b - a for a, b in rows[i])
            if cols is not None:
                k0, k1 = cols
                codes = codes[:n * k // 2].view(n, k // 2)[:, k0 // 2:k1 // 2].reshape(-1)
                absmax = absmax.view(n, k // bs)[:, k0 // bs:k1 // bs].reshape(-1)
                shape[1] = k1 - k0
            meta = {key: v for key, v in meta.items() if not key.startswith("nested")}
            meta["shape"] = shape
            cut = {"weight": codes.contiguous().view(store.dtype).reshape(-1, 1),
                   "weight.absmax": absmax.contiguous(), self.state_key:
                   bnb_format.build_quant_state(meta)}
            if "weight.quant_map" in raw:
                cut["weight.quant_map"] = raw["weight.quant_map"]
            layer.raw_shards[i] = cut
            layer.bnb_meta[i] = meta

    def reference(self, t, rows, cols, where):
        # bitsandbytes dequantizes to the weight's own dtype (the quant_state's) first.
        return bnb_format.dequantize_4bit(
            t["weight"], t["weight.absmax"], t[self.state_key],
            quant_map=t.get("weight.quant_map"), nested_absmax=t.get("weight.nested_absmax"),
            nested_quant_map=t.get("weight.nested_quant_map")).float()

    def tie_to(self, layer, embedding) -> None:
        raise UnsupportedError("lm_head is tied to the embeddings but the skip list "
                               "(llm_int8_skip_modules) asks to quantize it",
                               hint="add lm_head to llm_int8_skip_modules")


class BnbInt8LinearMethod(PackedLinearMethod):
    def __init__(self, params: BnbParams, policy: str) -> None:
        super().__init__(policy)
        self.p = params
        self.label = params.label()

    def kernels(self):
        from quantrt.quant.int_kernels import TritonWQKernel
        from quantrt.quant.lut_kernels import CpuInt8Kernel
        from quantrt.quant.packed import ReferenceKernel

        return (TritonWQKernel, CpuInt8Kernel, ReferenceKernel)

    def specs(self, rows: int, cols: int) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((rows, cols), (torch.int8,), why=f"N={rows} x K={cols} int8"),
            "SCB": TensorSpec((rows,), (torch.float32,), why=f"one absmax per row, N={rows}"),
            "weight_format": TensorSpec((), (torch.uint8,), required=False,
                                        why="bitsandbytes' layout code, 0 = row-major"),
        }

    def load_weight(self, layer, name, tensor, shard) -> None:
        if name == "weight_format" and isinstance(tensor, torch.Tensor) and tensor.numel() == 1:
            tensor = tensor.reshape(())
            code = int(tensor)
            if code != 0:
                raise UnsupportedError(
                    f"tensor {shard_name(layer, shard, name)} = {code}: bitsandbytes' "
                    f"{INT8_LAYOUTS.get(code, 'unknown')} tiled int8 layout is not supported",
                    hint="re-save the model with a recent bitsandbytes (row-major layout)")
        super().load_weight(layer, name, tensor, shard)

    def _scales(self, t) -> torch.Tensor:
        # float32(1/127) as bitsandbytes multiplies; applied to the scale first so that the
        # integer form's (q - 128) * scale is exactly the same product.
        return t["SCB"].float() * torch.tensor(bnb_format._INV127, dtype=torch.float32)

    def reference(self, t, rows, cols, where):
        return t["weight"].float() * self._scales(t).reshape(-1, 1)

    def to_int(self, t, rows, cols, where):
        q = (t["weight"].to(torch.int16) + 128).to(torch.uint8).t()
        zeros = torch.full((1, rows), 128, dtype=torch.int32, device=q.device)
        return IntWeight(q, self._scales(t).reshape(1, rows), zeros, None, cols, 8)

    tie_to = Bnb4bitLinearMethod.tie_to


class BitsAndBytesConfig(QuantConfig):
    name = "bitsandbytes"
    aliases = ("bnb", "bitsandbytes-4bit", "bitsandbytes-8bit")
    online: ClassVar[bool] = True   # detect.resolve: may quantize an unquantized checkpoint

    def __init__(self, params: BnbParams, skip: tuple[str, ...] | None = None,
                 online: bool = False, policy: str = "auto") -> None:
        self.params = params
        self.explicit_skip = skip
        # transformers keeps the output embedding unquantized unless a skip list is given.
        self.skip = ("lm_head",) if skip is None else skip
        self.is_online = online
        self.policy = policy

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BitsAndBytesConfig":
        four = check_bool(config_get(config, "load_in_4bit", "_load_in_4bit", default=False),
                          "load_in_4bit")
        eight = check_bool(config_get(config, "load_in_8bit", "_load_in_8bit", default=False),
                           "load_in_8bit")
        if four == eight:
            raise ConfigError("bitsandbytes settings must set exactly one of load_in_4bit and "
                              f"load_in_8bit (load_in_4bit={four}, load_in_8bit={eight})")
        if eight and config_get(config, "llm_int8_has_fp16_weight", default=False) is True:
            raise UnsupportedError("bitsandbytes 'llm_int8_has_fp16_weight': true keeps float "
                                   "weights for training; there are no int8 weights to load")
        def text(key: str, default: str) -> Any:  # "torch.float16" and "NF4" occur too
            v = config_get(config, key, default=default)
            return v.removeprefix("torch.").lower() if isinstance(v, str) else v

        params = BnbParams(
            bits=4 if four else 8, quant_type=text("bnb_4bit_quant_type", "fp4"),
            double_quant=config_get(config, "bnb_4bit_use_double_quant", default=False),
            compute_dtype=text("bnb_4bit_compute_dtype", "float32"),
            quant_storage=text("bnb_4bit_quant_storage", "uint8"),
            threshold=config_get(config, "llm_int8_threshold", default=6.0))
        skip = check_skip_list(config.get("llm_int8_skip_modules"), "llm_int8_skip_modules")
        return cls(params, skip)

    @classmethod
    def for_online(cls, name: str) -> "BitsAndBytesConfig":
        """``--quantization bitsandbytes`` on an unquantized checkpoint: NF4 with double
        quant (QLoRA's setting), block 64, lm_head and embeddings left as they are."""
        if "8bit" in name.replace("-", "").replace("_", ""):
            raise UnsupportedError("online LLM.int8 quantization is not supported",
                                   hint="use --quantization bitsandbytes (NF4)")
        return cls(BnbParams(bits=4, quant_type="nf4", double_quant=True), online=True)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | EmbeddingMethod:
        from quantrt.models.layers import VocabEmbedding

        if isinstance(layer, VocabEmbedding):
            return UnquantizedEmbeddingMethod()
        if not is_quantized(layer, lambda n: not matches_any(n, self.skip)):
            return UnquantizedLinearMethod()
        if self.params.bits == 8:
            return BnbInt8LinearMethod(self.params, self.policy)
        return Bnb4bitLinearMethod(self.params, self.policy, online=self.is_online)

    def settings(self) -> dict[str, Any]:
        p = self.params
        out: dict[str, Any] = {"bits": p.bits}
        if p.bits == 4:
            out.update(quant_type=p.quant_type, double_quant=p.double_quant,
                       compute_dtype=p.compute_dtype, quant_storage=p.quant_storage)
        else:
            # Reported as the checkpoint says; the matmul here is weight-only (no outliers).
            out.update(llm_int8_threshold=p.threshold, activations="not quantized")
        out["skip_modules"] = list(self.skip)
        out["online"] = self.is_online
        return out
