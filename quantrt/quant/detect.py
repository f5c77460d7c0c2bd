"""Detect a checkpoint's quantization method from its files, and reconcile it with a
``--quantization`` override (a contradiction is an error, never a silent downgrade)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from quantrt.errors import ConfigError, FormatError
from quantrt.quant.base import QuantConfig, config_class, normalize_method_name

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
    if not isinstance(data, dict):
        raise FormatError("expected a JSON object at the top level", where=path)
    return data


def _method_of(settings: dict[str, Any], where: str) -> str:
    if settings.get("load_in_4bit") or settings.get("load_in_8bit"):
        return "bitsandbytes"
    producer = settings.get("producer")
    if isinstance(producer, dict) and producer.get("name") == "modelopt":
        return "modelopt"
    method = settings.get("quant_method")
    if not isinstance(method, str) or not method:
        raise ConfigError("quantization settings have no 'quant_method'", where=where,
                          hint="add quant_method or pass --quantization NAME")
    return normalize_method_name(method)


def detect_hf(model_dir: str, config: dict[str, Any]) -> DetectedQuant:
    """Quantization of an HF-layout directory whose config.json was parsed into ``config``."""
    cfg_path = os.path.join(model_dir, "config.json")
    for key in ("quantization_config", "compression_config"):
        if isinstance(config.get(key), dict):
            return DetectedQuant(_method_of(config[key], cfg_path), config[key], cfg_path)
    text_cfg = config.get("text_config")
    if isinstance(text_cfg, dict) and isinstance(text_cfg.get("quantization_config"), dict):
        qc = text_cfg["quantization_config"]
        return DetectedQuant(_method_of(qc, cfg_path), qc, cfg_path)
    for name in SIDE_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            settings = read_json(path)
            if name == "hf_quant_config.json":
                settings = {**settings.get("quantization", {}), "producer": settings.get("producer")}
            elif "quant_method" not in settings and "bits" in settings:
                settings = {**settings, "quant_method": "gptq"}  # AutoGPTQ's quantize_config.json
            return DetectedQuant(_method_of(settings, path), settings, path)
    return DetectedQuant("none", {}, None)


def resolve(detected: DetectedQuant, override: str | None) -> QuantConfig:
    """The QuantConfig to load with, honouring ``override`` only where it agrees."""
    if override is not None:
        want = normalize_method_name(override)
        cls = config_class(want)  # unknown or unsupported names fail here
        have = FORMAT_OF_NAME.get(detected.method, detected.method)
        if FORMAT_OF_NAME.get(want, want) != have and normalize_method_name(cls.name) != have:
            raise ConfigError(
                f"--quantization {override} contradicts the checkpoint, which is "
                f"{'unquantized' if have == 'none' else have}",
                where=detected.where,
                hint="drop --quantization to use the checkpoint's own method")
    cls = config_class(detected.method)
    try:
        return cls.from_config(detected.settings)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {detected.method} quantization settings: {exc}",
                          where=detected.where) from None
