"""Writing a checkpoint so that an interrupted run never looks complete.

Everything goes into a hidden temporary sibling of the output (same file system, so the
final ``os.rename`` is atomic); the temp is removed on any failure, including Ctrl-C.
Safetensors shards are flushed as they fill, which bounds the memory a conversion holds
to one shard of *output* (quantized, so a fraction of the source) at a time.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def atomic_output(out: str | os.PathLike, is_file: bool = False) -> Iterator[str]:
    """Yield a temp directory; on success its content becomes ``out`` (a directory, or
    with ``is_file`` the single file the temp holds)."""
    out = os.path.abspath(os.fspath(out))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-",
                           dir=os.path.dirname(out))
    try:
        yield tmp
        if is_file:
            files = os.listdir(tmp)
            if len(files) != 1:
                raise RuntimeError(f"expected one output file, the writer made {files}")
            os.rename(os.path.join(tmp, files[0]), out)
        else:
            os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


class ShardedSafetensors:
    """``add`` tensors; shards of at most ``shard_bytes`` are written as they fill, named
    like transformers' ``save_pretrained`` (``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``)."""

    def __init__(self, directory: str, shard_bytes: int = 2 << 30) -> None:
        self.dir = directory
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.files):
            raise RuntimeError(f"tensor {name} written twice")
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        fname = f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, os.path.join(self.dir, fname), metadata={"format": "pt"})
        self.files.append((fname, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, tensors), final in zip(self.files, names):
            os.rename(os.path.join(self.dir, tmp), os.path.join(self.dir, final))
            weight_map.update({t: final for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return names


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
