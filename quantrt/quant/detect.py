"""Detect a checkpoint's quantization method from its files, and reconcile it with a
``--quantization`` override (a contradiction is an error, never a silent downgrade)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from quantrt.errors import ConfigError, FormatError, SourceError, UnsupportedError
from quantrt.quant.base import QuantConfig, canonical_method, config_class, normalize_method_name

# Files some producers write next to config.json instead of a quantization_config key.
SIDE_FILES = ("quantize_config.json", "quant_config.json", "hf_quant_config.json")

# Names that select a kernel for the same on-disk format (vLLM accepts them too).
FORMAT_OF_NAME = {"gptq-marlin": "gptq", "awq-marlin": "awq"}


@dataclass(frozen=True)
class DetectedQuant:
    method: str                     # normalised name, e.g. "gguf", "none", "awq"
    settings: dict[str, Any] = field(default_factory=dict)
    where: str | None = None        # file the settings came from


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise FormatError(f"not valid JSON ({exc.msg} at line {exc.lineno})", where=path) from None
    except UnicodeDecodeError:
        raise FormatError("not a UTF-8 text file", where=path) from None
    except RecursionError:
        raise FormatError("JSON nested too deeply", where=path) from None
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or exc}", where=path) from None
    if not isinstance(data, dict):
        raise FormatError("expected a JSON object at the top level", where=path)
    return data


def _method_of(settings: dict[str, Any], where: str, default: str | None = None) -> str:
    if settings.get("load_in_4bit") or settings.get("load_in_8bit"):
        return "bitsandbytes"
    producer = settings.get("producer")
    if isinstance(producer, dict) and producer.get("name") == "modelopt":
        # vLLM serves NVFP4 exports through a method of its own.
        algo = str(settings.get("quant_algo") or "").upper()
        return "modelopt-fp4" if "FP4" in algo else "modelopt"
    method = settings.get("quant_method", default)
    if not isinstance(method, str) or not method.strip():
        raise ConfigError("quantization settings have no 'quant_method'", where=where,
                          hint="add quant_method or pass --quantization NAME")
    method = normalize_method_name(method)
    # AutoGPTQ marks GPTQ weights saved in Marlin's pre-tiled layout this way (older
    # versions with is_marlin_format); the tensors are Marlin's, not GPTQ's.
    fmt = settings.get("checkpoint_format")
    if method == "gptq" and ((isinstance(fmt, str) and fmt.lower() == "marlin")
                             or settings.get("is_marlin_format") is True):
        return "marlin"
    return method


def detect_hf(model_dir: str, config: dict[str, Any]) -> DetectedQuant:
    """Quantization of an HF-layout directory whose config.json was parsed into ``config``."""
    cfg_path = os.path.join(model_dir, "config.json")
    if isinstance(config.get("quantization_config"), dict):
        qc = config["quantization_config"]
        return DetectedQuant(_method_of(qc, cfg_path), qc, cfg_path)
    if isinstance(config.get("compression_config"), dict):
        # Only compressed-tensors (llm-compressor/sparseml) writes this key, sometimes
        # without a quant_method.
        qc = config["compression_config"]
        return DetectedQuant(_method_of(qc, cfg_path, "compressed-tensors"), qc, cfg_path)
    text_cfg = config.get("text_config")
    if isinstance(text_cfg, dict) and isinstance(text_cfg.get("quantization_config"), dict):
        qc = text_cfg["quantization_config"]
        return DetectedQuant(_method_of(qc, cfg_path), qc, cfg_path)
    for name in SIDE_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            settings = read_json(path)
            if name == "hf_quant_config.json":
                quant = settings.get("quantization", {})
                if not isinstance(quant, dict):
                    raise ConfigError("'quantization' must be a JSON object", where=path)
                settings = {**quant, "producer": settings.get("producer")}
            elif "quant_method" not in settings:
                # Older AutoAWQ (w_bit, q_group_size) and AutoGPTQ (bits) name no method.
                if "w_bit" in settings:
                    settings = {**settings, "quant_method": "awq"}
                elif "bits" in settings:
                    settings = {**settings, "quant_method": "gptq"}
            return DetectedQuant(_method_of(settings, path), settings, path)
    if os.path.isfile(os.path.join(model_dir, "qmodel.pt")):
        # HQQ's own format writes no settings anywhere but in each layer of qmodel.pt.
        from formats import hqq_checkpoint

        if hqq_checkpoint.is_hqq_dir(model_dir):
            settings = hqq_checkpoint.detect_settings(model_dir)
            if settings is not None:
                return DetectedQuant("hqq", settings,
                                     os.path.join(model_dir, hqq_checkpoint.QMODEL))
    # config.json is what says "unquantized", so errors about that name it.
    return DetectedQuant("none", {}, cfg_path)


def _online_class(method: str) -> type[QuantConfig] | None:
    """The registered class of ``method`` if it can quantize an unquantized checkpoint at
    load (class attribute ``online = True`` and a ``for_online(name)`` classmethod)."""
    try:
        cls = config_class(method)
    except UnsupportedError:
        return None
    return cls if getattr(cls, "online", False) else None


def resolve(detected: DetectedQuant, override: str | None, where: str | None = None) -> QuantConfig:
    """The QuantConfig to load with, honouring ``override`` only where it agrees.

    ``where`` names the model in errors when the settings came from no file.
    """
    where = detected.where or where
    if override is not None:
        # The contradiction is checked before support: "your checkpoint is not AWQ" is
        # the useful answer even though AWQ is not implemented either.
        want = canonical_method(override, where)
        have = canonical_method(detected.method, where)
        online = _online_class(want) if have == "none" else None
        if online is not None:
            # A method that quantizes float weights while loading (bitsandbytes, fp8).
            return online.for_online(override)
        if FORMAT_OF_NAME.get(want, want) != FORMAT_OF_NAME.get(have, have):
            raise ConfigError(
                f"--quantization {override} contradicts the checkpoint, which is "
                f"{'unquantized' if have == 'none' else have}",
                where=where, hint="drop --quantization to use the checkpoint's own method")
    cls = config_class(detected.method, where)
    try:
        return cls.from_config(detected.settings)
    except ConfigError as exc:
        if exc.where is None:
            raise type(exc)(exc.message, where=where, hint=exc.hint) from None
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {detected.method} quantization settings: {exc}",
                          where=where) from None
