"""Resolve what the user typed as a model into files on disk.

Accepted: ``demo``; a ``.gguf`` file; an HF-layout directory (config.json + safetensors);
a directory holding exactly one ``.gguf``; a Hugging Face Hub id (downloaded when online).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from quantrt.errors import SourceError

GGUF_MAGIC = b"GGUF"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
KINDS = ("gguf", "hf_dir")
# Files a model needs from the hub; never pickles, never other frameworks' weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ModelSource:
    kind: str        # one of KINDS
    path: Path       # the .gguf file or the model directory
    name: str        # as the user typed it

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}")


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve_source(spec: str | os.PathLike) -> ModelSource:
    text = os.fspath(spec)
    if text == "demo":
        from quantrt.demo import ensure_demo

        return ModelSource("gguf", ensure_demo(), "demo")
    path = Path(text).expanduser()
    if path.is_file():
        if _is_gguf(path):
            return ModelSource("gguf", path, text)
        if path.name == "config.json":
            return ModelSource("hf_dir", path.parent, text)
        raise SourceError("not a model file: expected a .gguf file, a model directory or config.json",
                          where=path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", path, text)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], text)
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs[:5])
            raise SourceError(f"the directory holds several GGUF files ({names})", where=path,
                              hint="pass one of them")
        raise SourceError("the directory has no config.json and no .gguf file", where=path,
                          hint="pass a Hugging Face model directory or a .gguf file")
    if HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return ModelSource("hf_dir", _download_from_hub(text), text)
    raise SourceError("no such file or directory", where=text,
                      hint="pass a .gguf file, a model directory, a hub id like org/name, or 'demo'")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise SourceError("huggingface_hub is not installed", where=repo_id) from None
    try:
        local = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"could not fetch {repo_id!r} from the Hugging Face Hub: {reason[:200]}",
                          where=repo_id,
                          hint="check the id and network access (HF_HUB_OFFLINE=1 uses only the "
                               "local cache), or download it elsewhere and pass the directory") from None
    return Path(local)
