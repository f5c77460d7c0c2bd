"""``quantrt serve``: load the model, size the KV cache, run uvicorn with a graceful drain.

On SIGTERM (or the first Ctrl-C) the server stops taking connections and new requests get
503; requests in flight get ``shutdown_timeout`` seconds to finish, then the engine aborts
them, so every stream still ends well-formed (a last chunk with finish_reason "abort" and
``[DONE]``) and every non-streaming request gets its answer so far.
"""
from __future__ import annotations

import asyncio
import re
import signal
from types import FrameType
from typing import Any

import uvicorn

from quantrt.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """'1073741824', '512MiB', '1.5GiB', '2G' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    if not m or unit is None:
        raise ConfigError(f"--kv-cache-memory {text!r} is not a size",
                          hint="give bytes or a number with KiB/MiB/GiB (e.g. 2GiB)")
    size = int(float(m.group(1)) * unit)
    if size < 1:
        raise ConfigError(f"--kv-cache-memory must be positive, got {text!r}")
    return size


def build_engine(source: str, quantization: str | None, device: str | None, dtype: str,
                 kernels: str, *, max_model_len: int | None, max_num_seqs: int,
                 kv_cache_memory: str | None, gpu_memory_utilization: float | None,
                 kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1) -> Any:
    from quantrt.engine.async_engine import AsyncLLMEngine
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.parallel.launch import load_model

    if kv_cache_memory is not None and gpu_memory_utilization is not None:
        raise ConfigError("give --kv-cache-memory or --gpu-memory-utilization, not both")
    options: dict[str, Any] = {"max_num_seqs": max_num_seqs, "max_model_len": max_model_len,
                               "tensor_parallel_size": tensor_parallel_size,
                               "gpu_memory_utilization": gpu_memory_utilization,
                               "kv_cache_dtype": kv_cache_dtype}
    if kv_cache_memory is not None:
        options["kv_cache_memory"] = parse_size(kv_cache_memory)
    config = EngineConfig.from_options(**options)          # bad values fail before the load
    lm, executor = load_model(source, quantization, tensor_parallel_size, device=device,
                              dtype=dtype, kernels=kernels)
    try:
        return AsyncLLMEngine(LLMEngine(lm, config, executor))
    except BaseException:
        if executor is not None:
            executor.shutdown()
        raise


def serve(engine: Any, model_name: str, *, host: str, port: int, api_key: str | None,
          shutdown_timeout: float, log_level: str = "info") -> None:
    """Run until SIGTERM/SIGINT; returns after the drain and the engine's shutdown."""
    from quantrt.server.app import build_app

    app = build_app(engine, model_name, api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            # A backstop only: our drain ends every request before this.
                            timeout_graceful_shutdown=shutdown_timeout + 10)
    DrainingServer(config, app.state.quantrt, shutdown_timeout).run()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with a drain on the first exit signal (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, state: Any, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started and self.servers:
            # The real port (--port 0 picks a free one): scripts and tests read this line.
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"quantrt: serving {self.state.model_name!r} at http://{host}:{port}/v1",
                  flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # Runs as a signal handler: hand the work to the event loop.
        if not self._draining and self._loop is not None and sig in (signal.SIGTERM,
                                                                     signal.SIGINT):
            self._draining = True
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.state.draining = True

        def stop() -> None:
            # Aborts what still runs; each stream then gets its last output and ends.
            asyncio.ensure_future(self.state.engine.shutdown())

        self._loop.call_later(self.shutdown_timeout, stop)
