"""GPU catalog: how much memory each common GPU has, and which kernels it can run.

Memory is the total that ``nvidia-smi`` reports (MiB), which is what the driver can hand
out, not the marketing figure: an "A10G 24 GB" has 23028 MiB = 22.49 GiB (the H100 and H200
values were read on this project's machines).  Where a user knows better (a MIG slice,
another board revision), ``gpu_memory_gib`` overrides it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from quantrt.errors import ConfigError

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    # (major, minor); None for a custom --gpu-memory, where no kernel check is made.
    compute_capability: tuple[int, int] | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise ConfigError(f"GPU {self.name!r}: memory must be a positive number of bytes, "
                              f"got {self.memory_bytes!r}")

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    @property
    def capability(self) -> int | None:
        """Compute capability as vLLM writes it (8.6 -> 86)."""
        cc = self.compute_capability
        return None if cc is None else cc[0] * 10 + cc[1]


def _gpu(name: str, mib: int, cc: tuple[int, int], *aliases: str) -> GPU:
    return GPU(name, mib * MIB, cc, aliases)


CATALOG: tuple[GPU, ...] = (
    _gpu("T4", 15360, (7, 5), "tesla-t4"),
    _gpu("V100-16GB", 16160, (7, 0), "v100", "v100-sxm2-16gb"),
    _gpu("V100-32GB", 32510, (7, 0), "v100-sxm2-32gb"),
    _gpu("A10G", 23028, (8, 6), "a10g-24gb"),
    _gpu("A10", 22731, (8, 6), "a10-24gb"),
    _gpu("L4", 23034, (8, 9), "l4-24gb"),
    _gpu("RTX-3090", 24576, (8, 6), "3090", "rtx3090", "geforce-rtx-3090"),
    _gpu("RTX-4090", 24564, (8, 9), "4090", "rtx4090", "geforce-rtx-4090"),
    _gpu("RTX-A6000", 49140, (8, 6), "a6000"),
    _gpu("L40S", 46068, (8, 9), "l40s-48gb"),
    _gpu("A100-40GB", 40960, (8, 0), "a100-40", "a100-sxm4-40gb"),
    _gpu("A100-80GB", 81920, (8, 0), "a100", "a100-80", "a100-sxm4-80gb", "a100-80gb-pcie"),
    _gpu("H100-80GB", 81559, (9, 0), "h100", "h100-80", "h100-sxm", "h100-80gb-hbm3",
         "h100-pcie"),
    _gpu("H200", 143771, (9, 0), "h200-141gb", "h200-141"),
)


def _key(name: str) -> str:
    # "A100 80GB", "a100-80gb" and "A100_80GB" are the same GPU to a user, and so is
    # nvidia-smi's "NVIDIA A100-SXM4-80GB".
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    return re.sub(r"^(nvidia-)?(geforce-|tesla-)?", "", key)


def gpu_names() -> list[str]:
    return [g.name for g in CATALOG]


def lookup_gpu(name: str) -> GPU:
    """The catalog entry named ``name`` (case, spaces and dashes do not matter)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"GPU name must be a non-empty string, got {name!r}")
    key = _key(name)
    for gpu in CATALOG:
        if key in (_key(gpu.name), *(_key(a) for a in gpu.aliases)) \
                or key.replace("-", "") == _key(gpu.name).replace("-", ""):
            return gpu
    raise ConfigError(f"unknown GPU {name!r}",
                      hint=f"known: {', '.join(gpu_names())}; or give the memory with "
                           "--gpu-memory GIB")


def custom_gpu(memory_gib: float) -> GPU:
    """A GPU known only by its memory (GiB)."""
    if isinstance(memory_gib, bool) or not isinstance(memory_gib, (int, float)) \
            or not math.isfinite(memory_gib) or memory_gib <= 0:
        raise ConfigError(f"GPU memory must be a positive number of GiB, got {memory_gib!r}")
    return GPU(f"{memory_gib:g} GiB GPU", int(memory_gib * GIB))


def resolve_gpu(gpu: str | GPU | None, memory_gib: float | None) -> GPU | None:
    """The GPU an estimate is for: a catalog name, a :class:`GPU`, or only its memory."""
    if gpu is not None and memory_gib is not None:
        raise ConfigError("give a GPU name or its memory, not both",
                          hint="--gpu-memory alone describes a GPU missing from the catalog")
    if isinstance(gpu, GPU):
        return gpu
    if gpu is not None:
        return lookup_gpu(gpu)
    if memory_gib is not None:
        return custom_gpu(memory_gib)
    return None
