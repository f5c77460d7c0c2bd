"""Builds and loads the AVX2 CPU kernels of ``quant_kernels/csrc/`` as ``torch.ops.quantrt_cpu``.

The C++ sources are compiled once with the system C++ compiler (``$CXX`` or ``g++``)
straight into a shared library that registers torch ops: no ninja or setuptools needed,
about 30 s on 2 cores.  The library lands in ``<quantrt cache>/cpu_ext/<key>/``, where the
key hashes the sources, the compiler, the flags and the torch version, so a change to any
of them rebuilds and an unchanged setup never does.  Parallel processes wait on a file
lock instead of building twice.

:func:`status` says whether the kernels can run here and, if not, why: not Linux x86-64,
no AVX2/FMA/F16C, no compiler, a failed build (the log is kept), or
``QUANTRT_CPU_EXT=0`` in the environment.  Callers fall back to their torch paths then.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("ggml_gemm.cpp", "cpu_layers.cpp", "cpu_attention.cpp", "pool.cpp", "ops.cpp")
HEADERS = ("simd.h", "pool.h")
# -ffp-contract=off: only the explicit FMA intrinsics fuse, so the scalar tails round as
# written.  The kernels share work through their own pool (csrc/pool.h), not OpenMP.
FLAGS = ("-O3", "-std=c++20", "-fPIC", "-pthread", "-mavx2", "-mfma", "-mf16c",
         "-ffp-contract=off", "-DNDEBUG", "-w")
DISABLE_ENV = "QUANTRT_CPU_EXT"
_REQUIRED_FLAGS = ("avx2", "fma", "f16c")

_state: tuple[bool, str] | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _key(cxx: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(f"{cxx}\n{version}\n{FLAGS}\n{torch.__version__}\n{sys.version_info[:2]}".encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    from quantrt.demo import cache_dir

    return cache_dir() / "cpu_ext"


def _build(cxx: str, out_dir: Path) -> Path:
    """Compile every source in parallel, then link; raises RuntimeError with the log path."""
    from torch.utils.cpp_extension import include_paths

    lib = out_dir / "quantrt_cpu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "build.log"
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{CSRC}"]
    torch_lib = Path(torch.__file__).parent / "lib"
    if sys.stderr.isatty():  # a person waits on it; logs and tests are spared the line
        print(f"quantrt: building the CPU kernels into {out_dir} (once, ~30 s)", file=sys.stderr)
    with open(log, "w") as lf:
        procs = [subprocess.Popen([cxx, *FLAGS, *includes, "-c", str(CSRC / s),
                                   "-o", str(out_dir / f"{s}.o")], stdout=lf, stderr=lf)
                 for s in SOURCES]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError(f"compiling failed (log: {log})")
        tmp = out_dir / f"quantrt_cpu.{os.getpid()}.so"
        rc = subprocess.run([cxx, "-shared", "-pthread", *[str(out_dir / f"{s}.o") for s in SOURCES],
                             "-o", str(tmp), f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
                             f"-Wl,-rpath,{torch_lib}"], stdout=lf, stderr=lf).returncode
        if rc != 0:
            raise RuntimeError(f"linking failed (log: {log})")
    os.replace(tmp, lib)  # atomic: a reader never sees a half-written library
    return lib


def _load() -> tuple[bool, str]:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False, f"disabled by {DISABLE_ENV}=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"built for Linux x86-64 only (this is {sys.platform} {platform.machine()})"
    missing = [f for f in _REQUIRED_FLAGS if f not in _cpu_flags()]
    if missing:
        return False, f"the CPU lacks {'/'.join(m.upper() for m in missing)}"
    cxx = _compiler()
    if cxx is None:
        return False, f"no C++ compiler ({os.environ.get('CXX', 'g++')}) to build it"
    try:
        out_dir = _cache_root() / _key(cxx)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lib = _build(cxx, out_dir)
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as exc:
        return False, f"building the CPU kernels failed: {exc}"
    return True, ""


def status() -> tuple[bool, str]:
    """(True, "") once the kernels are loaded, else (False, why not); decided once per process."""
    global _state
    if _state is None:
        _state = _load()
    return _state


def available() -> bool:
    return status()[0]


def ops():
    """``torch.ops.quantrt_cpu``; call only after :func:`available` said yes."""
    return torch.ops.quantrt_cpu
