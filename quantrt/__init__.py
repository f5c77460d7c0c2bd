"""quantrt: a quantization-first LLM loader and runtime.

    from quantrt import LLM, SamplingParams
    llm = LLM("demo")                            # or a .gguf, a model dir, a hub id
    out = llm.generate(["Hello"], SamplingParams(max_tokens=8))[0]
    print(out.outputs[0].text)

    # lower level: quantrt.load(...) -> quantrt.LLMEngine(lm); quantrt.AsyncLLMEngine for asyncio

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
    "LLM": ("quantrt.llm", "LLM"),
    "AsyncLLMEngine": ("quantrt.engine.async_engine", "AsyncLLMEngine"),
    "RequestOutput": ("quantrt.engine.outputs", "RequestOutput"),
    "CompletionOutput": ("quantrt.engine.outputs", "CompletionOutput"),
    "QuantrtError": ("quantrt.errors", "QuantrtError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'quantrt' has no attribute {name!r}")
