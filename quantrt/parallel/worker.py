"""A tensor-parallel worker (ranks 1..N-1): load this rank's part of the model, then run
whatever rank 0 broadcasts until told to stop."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from quantrt.parallel.executor import LoadSpec, device_for, join_group


def worker_main(spec: LoadSpec, rank: int, size: int, port: int) -> None:
    try:
        group = join_group(spec, rank, size, port)
        from quantrt.engine.model_runner import ModelRunner
        from quantrt.loader import load

        lm = load(spec.source, spec.quantization, device=device_for(spec, rank),
                  dtype=spec.dtype, kernels=spec.kernels, progress=False,
                  tensor_parallel=group)
        runner = None
        while True:
            name, args = group.broadcast_object()
            if name == "stop":
                break
            if name == "memory":
                import torch.distributed as dist

                from quantrt.engine.llm_engine import kv_memory

                out: list[Any] = [None] * size
                dist.all_gather_object(out, kv_memory(lm, *args), group=group.control)
            elif name == "init_runner":
                runner = ModelRunner(lm, *args[0], **args[1])
            elif name == "execute":
                runner.run_local(*args)
            else:
                raise RuntimeError(f"unknown call {name!r}")
    except BaseException as exc:  # noqa: BLE001 - any failure ends this rank, loudly
        from quantrt.errors import QuantrtError

        msg = exc.message if isinstance(exc, QuantrtError) else "".join(
            traceback.format_exception(exc))
        print(f"quantrt: tensor-parallel rank {rank}: {msg}", file=sys.stderr, flush=True)
        os._exit(1)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(LoadSpec.from_json(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                int(sys.argv[4]))
