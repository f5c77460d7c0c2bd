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
        hint = ("pass the directory that holds it and its config.json"
                if path.suffix.lower() in (".safetensors", ".json", ".bin") else None)
        raise SourceError("not a model file: expected a .gguf file, a model directory or config.json",
                          where=path, hint=hint)
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
        # "models/foo" with a local models/ is a mistyped path, not a hub id to go looking for.
        if path.parent.is_dir():
            raise SourceError("no such file or directory", where=text,
                              hint=f"not looked up on the Hugging Face Hub because "
                                   f"{str(path.parent)!r} is a local directory")
        return ModelSource("hf_dir", _download_from_hub(text), text)
    if path.exists():
        raise SourceError("not a regular file or directory", where=text)
    raise SourceError("no such file or directory", where=text,
                      hint="pass a .gguf file, a model directory, a hub id like org/name, or 'demo'")


def _hub_reason(exc: Exception) -> tuple[str, str]:
    """(what went wrong, what to do) for a failed snapshot_download, in one line each."""
    from huggingface_hub import errors

    def kind(name: str) -> type | tuple:
        return getattr(errors, name, ())  # names differ across huggingface_hub versions

    if isinstance(exc, kind("GatedRepoError")):
        return ("the repository is gated", "accept its terms on huggingface.co and log in "
                                           "with `hf auth login`")
    if isinstance(exc, kind("RepositoryNotFoundError")):
        return ("no such repository (or it is private)", "check the id, or log in for a "
                                                         "private repository")
    if isinstance(exc, (kind("LocalEntryNotFoundError"), kind("OfflineModeIsEnabled"))):
        return ("it is not in the local Hugging Face cache and downloads are disabled "
                "(offline mode or no network)",
                "unset HF_HUB_OFFLINE and check network access, or download it elsewhere and "
                "pass the directory")
    text = " ".join(str(exc).split())
    first = text.split(". ")[0][:200] if text else type(exc).__name__
    return first, ("check the id and network access (HF_HUB_OFFLINE=1 uses only the local "
                   "cache), or download it elsewhere and pass the directory")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise SourceError("huggingface_hub is not installed", where=repo_id) from None
    try:
        local = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear line
        reason, hint = _hub_reason(exc)
        raise SourceError(f"could not fetch {repo_id!r} from the Hugging Face Hub: {reason}",
                          where=repo_id, hint=hint) from None
    return Path(local)
