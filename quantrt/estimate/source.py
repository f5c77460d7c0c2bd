"""What an estimate reads: a config, never the weights.

SOURCE is a model directory (its config.json and quantization side files), a bare
config.json, a .gguf file or a directory holding one (its header: metadata and tensor
table), ``demo``, or a hub id ``org/name`` (config.json, plus a quantization side file when
config.json names no method, downloaded alone).  An HQQ directory keeps its settings only in
qmodel.pt's per-layer metadata, which detection reads memory-mapped (the weights' bytes
are not read).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantrt.errors import SourceError
from quantrt.estimate.arch import Arch, arch_from_gguf, arch_from_hf, weights
from quantrt.estimate.gguf_mix import GGUFFile, gguf_names
from quantrt.estimate.layouts import Layout
from quantrt.estimate.methods import layout_from_settings
from quantrt.quant.detect import SIDE_FILES, detect_hf, read_json
from quantrt.sources import GGUF_MAGIC, HUB_ID, _hub_reason, resolve_source


@dataclass(frozen=True)
class SourceModel:
    name: str                 # as the user gave it
    where: str                # the file the architecture came from
    arch: Arch
    layout: Layout            # the checkpoint's own storage
    quantized: bool
    extra_bytes: int = 0      # GGUF tensors outside the architecture (rope_freqs)
    metadata: dict[str, Any] = field(default_factory=dict)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_source(spec: str | os.PathLike) -> SourceModel:
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_file():
        if _is_gguf(path) or path.suffix.lower() == ".gguf":
            return _from_gguf(text, path)
        if path.suffix.lower() == ".json":
            return _from_config(text, path)
        raise SourceError("not a config or GGUF file", where=path,
                          hint="pass a model directory, its config.json, a .gguf file or a hub id")
    if path.is_dir():
        if (path / "config.json").is_file():
            return _from_config(text, path / "config.json")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(text, ggufs[0])
    if not path.exists() and text != "demo" and HUB_ID.match(text) \
            and not text.startswith((".", "/", "~")) and not path.parent.is_dir():
        return _from_config(text, _hub_config(text))
    # demo, and every other case, resolve as the loader would (same errors).
    src = resolve_source(text)
    if src.kind == "gguf":
        return _from_gguf(text, src.path)
    return _from_config(text, src.path / "config.json")


def _from_config(name: str, cfg_path: Path) -> SourceModel:
    where = str(cfg_path)
    raw = read_json(where)
    arch = arch_from_hf(raw, where)
    detected = detect_hf(str(cfg_path.parent), raw)
    layout = layout_from_settings(detected.method, detected.settings, detected.where or where)
    return SourceModel(name, where, arch, layout, detected.method != "none")


def _from_gguf(name: str, path: Path) -> SourceModel:
    from gguf import GGMLQuantizationType, LlamaFileType

    from formats.gguf_file import read_gguf

    where = str(path)
    with read_gguf(path) as gf:  # the header only: tensor data stay unread on disk
        meta, infos = gf.metadata, dict(gf.tensors)
    arch = arch_from_gguf(meta, set(infos), where)
    types = {n: GGMLQuantizationType(i.ggml_type).name for n, i in infos.items()}
    file_type = meta.get("general.file_type")
    try:
        label = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except (ValueError, TypeError):
        label = f"file_type {file_type}" if file_type is not None else "mixed"
    layout = GGUFFile(label, types)
    known = set()
    for w in weights(arch):
        for merged in (True, False):
            base = gguf_names(w, merged)
            known |= {f"{base}.weight", f"{base}.bias"}
    extra = sum(i.nbytes for n, i in infos.items() if n not in known)
    return SourceModel(name, where, arch, layout, quantized=True, extra_bytes=extra,
                       metadata={"file_bytes": sum(i.nbytes for i in infos.values())})


def _hub_config(repo_id: str) -> Path:
    """config.json of a hub repository (and a quantization side file next to it, when one
    exists), downloaded alone into the Hugging Face cache."""
    try:
        from huggingface_hub import errors, hf_hub_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise SourceError("huggingface_hub is not installed", where=repo_id) from None
    try:
        cfg = Path(hf_hub_download(repo_id, "config.json"))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear line
        # A missing cache entry offline is an EntryNotFoundError too: only the remote
        # answer "no such file" means the repository lacks config.json.
        if isinstance(exc, errors.EntryNotFoundError) \
                and not isinstance(exc, errors.LocalEntryNotFoundError):
            raise SourceError("the repository has no config.json", where=repo_id,
                              hint="for a GGUF-only repository, download one .gguf and pass "
                                   "it (only its header is read)") from None
        reason, hint = _hub_reason(exc)
        raise SourceError(f"could not fetch config.json of {repo_id!r} from the Hugging Face "
                          f"Hub: {reason}", where=repo_id, hint=hint) from None
    raw = read_json(str(cfg))
    if not any(isinstance(raw.get(k), dict) for k in ("quantization_config", "compression_config")):
        for side in SIDE_FILES:
            try:
                hf_hub_download(repo_id, side)   # lands next to config.json in the snapshot
                break
            except Exception:  # noqa: BLE001 - absent (the usual case) or unreachable: skip
                continue
    return cfg
