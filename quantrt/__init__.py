"""quantrt: a quantization-first LLM loader and runtime.

    import quantrt
    lm = quantrt.load("demo")                    # or a .gguf, a model dir, a hub id
    engine = quantrt.LLMEngine(lm)
    seq = engine.generate([lm.tokenizer.encode("Hello")], quantrt.SamplingParams(max_tokens=8))[0]

Heavy modules (torch, transformers) are imported on first use, so ``quantrt --help`` and
error paths stay fast.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("quantrt.loader", "load"),
    "LoadedModel": ("quantrt.loader", "LoadedModel"),
    "LLMEngine": ("quantrt.engine.llm_engine", "LLMEngine"),
    "EngineConfig": ("quantrt.engine.llm_engine", "EngineConfig"),
    "SamplingParams": ("quantrt.engine.sequence", "SamplingParams"),
    "QuantrtError": ("quantrt.errors", "QuantrtError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'quantrt' has no attribute {name!r}")
