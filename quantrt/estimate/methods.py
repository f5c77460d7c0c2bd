"""Which layouts an estimate compares: named presets (what a user would convert to), custom
specs ``NAME:key=value,...`` and the checkpoint's own method from its quantization settings.

Presets use each method's common defaults: group size 128 for GPTQ/AWQ/W4A16, symmetric
GPTQ without act-order, NF4 with double quantization (QLoRA's), HQQ group 64 on axis 1,
llama.cpp's own mixes for GGUF file types.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from quantrt.errors import ConfigError, UnsupportedError
from quantrt.estimate.bnb_hqq import HQQ, BnB4, BnB8
from quantrt.estimate.compressed import CompressedTensors, CTScheme, compressed_from_config
from quantrt.estimate.gguf_mix import FILE_TYPES, GGUFMix
from quantrt.estimate.layouts import FP8, Layout, Unquantized
from quantrt.estimate.packed_int import AWQ, GPTQ, Marlin

CHECKPOINT = "checkpoint"   # the source's own method
ALL = "all"

PRESETS: dict[str, Layout] = {
    "bf16": Unquantized("bfloat16"),
    "fp16": Unquantized("float16"),
    "fp8": FP8(),
    "fp8-block": FP8(block=(128, 128)),
    "fp8-dynamic": CompressedTensors((CTScheme(num_bits=8, type="float", strategy="channel",
                                               group_size=None, format="float-quantized"),)),
    "int8": BnB8(),
    "w8a8-int8": CompressedTensors((CTScheme(num_bits=8, strategy="channel", group_size=None,
                                             format="int-quantized"),)),
    "gptq-8bit": GPTQ(bits=8),
    "w4a16": CompressedTensors((CTScheme(num_bits=4, strategy="group", group_size=128),)),
    "awq": AWQ(),
    "gptq-4bit": GPTQ(bits=4),
    "nf4": BnB4(),
    "fp4": BnB4(quant_type="fp4", double_quant=False),
    "hqq-4bit": HQQ(nbits=4),
    "gptq-3bit": GPTQ(bits=3),
    "hqq-3bit": HQQ(nbits=3),
    "gptq-2bit": GPTQ(bits=2),
    **{ft.lower(): GGUFMix(ft) for ft in FILE_TYPES},
}
DEFAULT_PRESETS = ("bf16", "fp8", "int8", "awq", "gptq-4bit", "nf4", "gptq-3bit", "q8_0",
                   "q4_k_m")
# Bases of custom specs besides the presets.
FAMILIES: dict[str, Layout] = {"unquantized": Unquantized(), "gptq": GPTQ(), "marlin": Marlin(),
                               "bnb4": BnB4(), "bnb8": BnB8(), "hqq": HQQ(), "gguf": GGUFMix(),
                               "compressed-tensors": PRESETS["w4a16"]}


@dataclass(frozen=True)
class Method:
    name: str                # as the user wrote it ("checkpoint" for the source's own)
    layout: Layout
    from_checkpoint: bool = False


def _value(text: str) -> Any:
    text = text.strip()
    if re.fullmatch(r"\d+x\d+", text):  # a block shape, 128x128 (commas separate settings)
        return tuple(int(v) for v in text.split("x"))
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def _checked(obj: Any, key: str, value: Any, spec: str) -> Any:
    """``value`` if it has the type of field ``key`` of ``obj`` (a typo must not pass)."""
    f = next(f for f in dataclasses.fields(obj) if f.name == key)
    current = getattr(obj, key)
    if value is None and "None" in str(f.type):
        return value
    # tuple first: "tuple[int, int] | None" also names int.
    kinds = {tuple: "a list", bool: "true or false", str: "a word", int: "an integer"}
    for kind, words in kinds.items():
        if isinstance(current, kind) or (current is None and kind.__name__ in str(f.type)):
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not ok:
                raise ConfigError(f"method {spec!r}: {key} must be {words}, got {value!r}")
            return value
    return value


def _override(base: Layout, key: str, value: Any, spec: str) -> Layout:
    names = {f.name for f in dataclasses.fields(base)}
    if isinstance(base, CompressedTensors) and key not in names and len(base.schemes) == 1:
        scheme = base.schemes[0]
        if key in {f.name for f in dataclasses.fields(CTScheme)}:
            value = _checked(scheme, key, value, spec)
            return dataclasses.replace(base, schemes=(dataclasses.replace(scheme, **{key: value}),))
        names |= {f.name for f in dataclasses.fields(CTScheme)}
    if key not in names:
        raise ConfigError(f"method {spec!r}: unknown setting {key!r}",
                          hint=f"settings: {', '.join(sorted(names))}")
    return dataclasses.replace(base, **{key: _checked(base, key, value, spec)})


def parse_method(spec: str) -> Method:
    """A preset name, or ``NAME:key=value,...`` with NAME a preset or a family
    (gptq, awq, bnb4, bnb8, fp8, hqq, gguf, compressed-tensors, unquantized)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"quantization method must be a non-empty string, got {spec!r}")
    name, _, options = spec.strip().partition(":")
    key = name.strip().lower()
    base = PRESETS.get(key) or FAMILIES.get(key.replace("_", "-"))
    if base is None:
        raise ConfigError(f"unknown quantization method {name!r}",
                          hint=f"presets: {', '.join(PRESETS)}; or {CHECKPOINT!r}, {ALL!r}, or "
                               f"FAMILY:key=value,... with FAMILY one of {', '.join(FAMILIES)}")
    layout = base
    for item in filter(None, (p.strip() for p in options.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ConfigError(f"method {spec!r}: expected key=value, got {item!r}")
        try:
            layout = _override(layout, k.strip(), _value(v), spec)
        except ConfigError as exc:
            message = exc.message if spec in exc.message else f"method {spec!r}: {exc.message}"
            raise ConfigError(message, hint=exc.hint) from None
        except TypeError as exc:
            raise ConfigError(f"method {spec!r}: {exc}") from None
    return Method(spec.strip(), layout)


def split_specs(values: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """Method specs from CLI values: repeated options, or one value separated by spaces or
    commas; a piece with ``=`` continues the previous spec's settings."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    specs: list[str] = []
    for value in values:
        for piece in value.replace(" ", ",").split(","):
            piece = piece.strip()
            if not piece:
                continue
            if "=" in piece and ":" not in piece and specs:
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


# -- the checkpoint's own settings -----------------------------------------------------------
def _tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _gptq_dynamic(dynamic: Any) -> tuple:
    rules = []
    for key, override in (dynamic or {}).items():
        negative = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        keep = {k: override[k] for k in ("bits", "group_size", "desc_act", "sym")
                if isinstance(override, dict) and k in override}
        rules.append((pattern, None if negative else tuple(keep.items())))
    return tuple(rules)


def layout_from_settings(method: str, s: dict[str, Any], where: str) -> Layout:
    """The layout a checkpoint with quantization ``method`` and settings ``s`` is stored in."""
    try:
        return _from_settings(method, s, where)
    except ConfigError as exc:
        if exc.where is not None:
            raise
        raise type(exc)(exc.message, where=where, hint=exc.hint) from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"invalid {method} quantization settings: {exc}", where=where) from None


def _from_settings(method: str, s: dict[str, Any], where: str) -> Layout:
    if method in ("none", "unquantized"):
        return Unquantized()
    fmt = str(s.get("checkpoint_format") or s.get("format") or "gptq").lower()
    if method == "marlin" or (method in ("gptq", "gptq-marlin") and fmt == "marlin"):
        if int(s.get("bits", 4)) != 4:
            raise UnsupportedError("Marlin checkpoints are 4-bit only", where=where)
        return Marlin(group_size=int(s.get("group_size", 128)),
                      lm_head=bool(s.get("lm_head", False)))
    if method in ("gptq", "gptq-marlin"):
        if fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedError(f"estimate has no layout for GPTQ checkpoint_format {fmt!r}",
                                   where=where, hint="supported: gptq, gptq_v2, marlin")
        return GPTQ(bits=int(s.get("bits", 4)), group_size=int(s.get("group_size", -1)),
                    desc_act=bool(s.get("desc_act", False)), sym=bool(s.get("sym", True)),
                    lm_head=bool(s.get("lm_head", False)),
                    # AutoGPTQ's quantize_config.json names the weights file; its QuantLinear
                    # always has a bias.
                    zero_bias="model_file_base_name" in s or "model_name_or_path" in s,
                    dynamic=_gptq_dynamic(s.get("dynamic")))
    if method in ("awq", "awq-marlin"):
        bits = int(s.get("bits", s.get("w_bit", 4)))
        if bits != 4:
            raise UnsupportedError(f"AWQ with {bits} bits has no known layout", where=where)
        return AWQ(group_size=int(s.get("group_size", s.get("q_group_size", 128))),
                   version=str(s.get("version", "gemm")).lower(),
                   zero_point=bool(s.get("zero_point", True)),
                   modules_to_not_convert=_tuple(s.get("modules_to_not_convert")))
    if method == "bitsandbytes":
        # transformers skips the output embedding unless told otherwise, and keeps it
        # skipped when a list is given.
        skip = tuple(dict.fromkeys((*_tuple(s.get("llm_int8_skip_modules")), "lm_head")))
        if s.get("load_in_4bit"):
            return BnB4(quant_type=str(s.get("bnb_4bit_quant_type", "fp4")),
                        double_quant=bool(s.get("bnb_4bit_use_double_quant", False)),
                        storage=str(s.get("bnb_4bit_quant_storage") or "uint8"),
                        skip_modules=skip)
        return BnB8(skip_modules=skip)
    if method == "compressed-tensors":
        return compressed_from_config(s, where)
    if method == "fp8":
        block = s.get("weight_block_size")
        return FP8(block=tuple(int(b) for b in block) if block else None,
                   static_activations=s.get("activation_scheme") == "static",
                   modules_to_not_convert=_tuple(s.get("modules_to_not_convert")
                                                 or s.get("ignored_layers")))
    if method == "hqq":
        qc = s.get("quant_config") if isinstance(s.get("quant_config"), dict) else s
        wq = qc.get("weight_quant_params") or {}
        return HQQ(nbits=int(wq.get("nbits", 4)), group_size=wq.get("group_size", 64),
                   axis=int(wq.get("axis", 1)),
                   skip_modules=_tuple(s.get("skip_modules", ["lm_head"])))
    raise UnsupportedError(f"estimate has no tensor layout for {method!r} checkpoints",
                           where=where, hint="pass --quantization with a known method to "
                                             "estimate that instead")


def checkpoint_method(layout: Layout) -> Method:
    return Method(CHECKPOINT, layout, from_checkpoint=True)


def choose(specs: list[str], checkpoint: Method | None, quantized: bool) -> list[Method]:
    """Rows to estimate: the user's specs, ``all`` presets, or by default the checkpoint's
    own method when it is quantized and common presets when it is not."""
    if not specs:
        if quantized and checkpoint:
            return [checkpoint]
        return [parse_method(p) for p in DEFAULT_PRESETS]
    out: list[Method] = []
    for spec in specs:
        if spec.lower() == ALL:
            out += ([checkpoint] if quantized and checkpoint else [])
            out += [parse_method(p) for p in PRESETS]
        elif spec.lower() == CHECKPOINT:
            if checkpoint is None:
                raise ConfigError("this source has no checkpoint method to estimate")
            out.append(checkpoint)
        else:
            out.append(parse_method(spec))
    seen: set[str] = set()
    return [m for m in out if not (m.name in seen or seen.add(m.name))]
