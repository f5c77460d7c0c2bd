"""The KV cache's element type (``EngineConfig.kv_cache_dtype``).

The names are the memory estimator's (``quantrt.estimate.memory.KV_CACHE_DTYPES``, vLLM's
spelling), so ``quantrt estimate --kv-cache-dtype`` and the engine agree on what they mean.
FP8 caches hold K/V with a per-tensor scale of 1.0, as vLLM's fp8 cache without calibrated
scales: values beyond the format's finite range are clamped on write
(``quantrt.models.attention.to_cache_dtype``), and every attention path upcasts what it
reads to the query's dtype.
"""
from __future__ import annotations

import torch

from quantrt.errors import ConfigError
from quantrt.estimate.memory import KV_CACHE_DTYPES

TORCH_KV_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def check_kv_cache_dtype(name: object) -> None:
    if not isinstance(name, str) or name not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                          f"got {name!r}", hint="'auto' caches K/V in the model's dtype")


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the cache tensors; ``auto``: the model's."""
    check_kv_cache_dtype(name)
    return model_dtype if name == "auto" else TORCH_KV_DTYPES[name]
