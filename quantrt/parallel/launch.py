"""Load a model over N ranks and hand back rank 0's engine parts."""
from __future__ import annotations

import os
from typing import Any

from quantrt.errors import ConfigError


def device_type(device: Any) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda" and torch.device(device).index not in (None, 0):
        raise ConfigError(f"device {device!r}: tensor parallelism places rank r on cuda:r",
                          hint="pass --device cuda")
    return kind


def load_parallel(source: str | os.PathLike, quantization: str | None, size: int, *,
                  device: Any = None, dtype: Any = None, kernels: str = "auto",
                  progress: bool | None = None) -> tuple[Any, Any]:
    """(rank 0's LoadedModel, the executor running ranks 1..size-1)."""
    from quantrt.loader import check_options, load
    from quantrt.parallel.executor import LoadSpec, TPExecutor, device_for
    from quantrt.sources import resolve_source

    check_options(device, dtype, kernels)
    src = resolve_source(source)       # once, here: the workers get the local path
    if dtype is not None and not isinstance(dtype, str):   # a torch.dtype: by name
        dtype = str(dtype).removeprefix("torch.")
    spec = LoadSpec(str(src.path), quantization, device_type(device), dtype, kernels)
    executor = TPExecutor(spec, size)
    try:
        lm = load(src, quantization, device=device_for(spec, 0), dtype=dtype, kernels=kernels,
                  progress=progress, tensor_parallel=executor.group)
    except BaseException:
        executor.shutdown()
        raise
    return lm, executor


def load_model(source: str | os.PathLike, quantization: str | None, tensor_parallel_size: int,
               **load_kw: Any) -> tuple[Any, Any]:
    """(LoadedModel, executor or None): one process, or rank 0 of ``tensor_parallel_size``."""
    from quantrt.loader import load

    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ConfigError(f"tensor_parallel_size must be a positive integer, got "
                          f"{tensor_parallel_size!r}")
    if tensor_parallel_size == 1:
        return load(source, quantization, **load_kw), None
    return load_parallel(source, quantization, tensor_parallel_size, **load_kw)
