"""Rank 0's side of tensor parallelism: start one worker process per other rank, join
them in a ``torch.distributed`` group, broadcast each call, and watch the workers.

Every rank loads its own part of the model (``quantrt.load(..., tensor_parallel=group)``)
and holds its own KV cache; the scheduler, block manager and sampler live on rank 0 only.
A worker that dies takes rank 0 down with a clear message instead of leaving it blocked
in a collective.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from quantrt.errors import ConfigError, QuantrtError
from quantrt.parallel.comm import TPGroup

# A collective that waits longer than this has lost a peer (the watcher reports deaths
# much sooner; this bounds the case where a peer hangs without dying).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class WorkerDied(QuantrtError):
    pass


@dataclass(frozen=True)
class LoadSpec:
    """What every rank needs to load the same model (plain data: sent to the workers)."""

    source: str
    quantization: str | None
    device_type: str            # "cuda" (rank r on cuda:r) or "cpu"
    dtype: str | None           # a DTYPES name
    kernels: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LoadSpec":
        return cls(**json.loads(text))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(spec: LoadSpec, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if spec.device_type == "cuda" else torch.device("cpu")


def join_group(spec: LoadSpec, rank: int, size: int, port: int) -> TPGroup:
    """Join the group (every rank calls this).  NCCL carries the model's collectives on
    GPUs; gloo carries host-side messages, and everything on the CPU."""
    if spec.device_type == "cuda":
        torch.cuda.set_device(rank)
    else:  # ranks share the cores: split them instead of oversubscribing
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    backend = "nccl" if spec.device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return TPGroup(rank, size, dist.group.WORLD, control)


class TPExecutor:
    def __init__(self, spec: LoadSpec, size: int) -> None:
        if size < 2:
            raise ConfigError(f"tensor_parallel_size {size}: an executor needs 2 or more ranks")
        if spec.device_type == "cuda" and torch.cuda.device_count() < size:
            raise ConfigError(f"tensor_parallel_size {size} needs {size} GPUs; this machine "
                              f"has {torch.cuda.device_count()}")
        if dist.is_initialized():
            raise ConfigError("a torch.distributed group is already running in this process",
                              hint="one tensor-parallel engine per process")
        self.spec, self.size = spec, size
        port = _free_port()
        # Fresh interpreters (not multiprocessing): CUDA cannot be forked, and spawn would
        # re-run the caller's main module.
        self.procs = [subprocess.Popen([sys.executable, "-m", "quantrt.parallel.worker",
                                        spec.to_json(), str(rank), str(size), str(port)])
                      for rank in range(1, size)]
        self._closing = False
        for p in self.procs:
            threading.Thread(target=self._watch, args=(p,), name="quantrt-tp-watch",
                             daemon=True).start()
        self.group = join_group(spec, 0, size, port)

    # -- supervision ----------------------------------------------------------------------
    def _dead(self) -> list[str]:
        return [f"rank {i + 1} (pid {p.pid}, exit code {p.returncode})"
                for i, p in enumerate(self.procs) if p.poll() is not None]

    def _watch(self, proc: subprocess.Popen) -> None:
        proc.wait()
        if self._closing:
            return
        # Rank 0 may be blocked in a collective that will never complete: report and leave.
        print(f"quantrt: error: tensor-parallel worker died: {', '.join(self._dead())}; "
              "shutting down (see the worker's message above)", file=sys.stderr, flush=True)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        os._exit(1)

    def check(self) -> None:
        dead = self._dead()
        if dead and not self._closing:
            raise WorkerDied(f"tensor-parallel worker died: {', '.join(dead)}")

    # -- calls ----------------------------------------------------------------------------
    def call(self, name: str, *args: Any) -> None:
        """Have every worker run ``name(*args)`` (rank 0 runs its own part itself)."""
        self.check()
        self.group.broadcast_object((name, args))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's answer to the last call, rank 0's ``value`` first."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self.group.control)
        return out

    def shutdown(self) -> None:
        if self._closing:
            return
        try:
            if not self._dead():
                self.group.broadcast_object(("stop", ()))
        finally:
            self._closing = True
            for p in self.procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            if dist.is_initialized():
                dist.destroy_process_group()
