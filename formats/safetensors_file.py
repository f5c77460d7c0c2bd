"""Validated, lazy safetensors checkpoints (single file or sharded) and legacy pickles.

Every header is checked before any tensor is read so that a truncated download or a
hand-edited file fails up front with one actionable :class:`FormatError`, rather than
as a Rust panic or a short read halfway through loading a model.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
from typing import TYPE_CHECKING, Any, Iterator

from safetensors import safe_open

from quantrt.errors import FormatError, SourceError

if TYPE_CHECKING:  # imported where tensors are made: validating headers needs no torch
    import torch

__all__ = ["SafetensorsCheckpoint", "TorchCheckpoint", "load_torch_checkpoint", "open_checkpoint"]

# Bits per element; sub-byte float formats pack several elements per byte.
_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library refuses larger headers too
_REDOWNLOAD = "the file is truncated or corrupt; re-download it"


def _read_header(path: str) -> tuple[dict[str, tuple[str, tuple[int, ...], int]],
                                     dict[str, str], int]:
    """Validate one file's header.

    Returns ({name: (dtype, shape, nbytes)}, metadata, number of data bytes).
    """
    def fail(message: str, hint: str = _REDOWNLOAD) -> FormatError:
        return FormatError(message, where=path, hint=hint)

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise fail(f"file is {size} bytes, shorter than the 8-byte safetensors header "
                           f"length")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise fail(f"header length {n} is larger than the file ({size} bytes)")
            if n > _MAX_HEADER_BYTES:
                raise fail(f"header length {n} exceeds the {_MAX_HEADER_BYTES}-byte limit")
            raw = fh.read(n)
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or exc}", where=path,
                          hint="check file permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting
        raise fail(f"header is not valid JSON ({exc.__class__.__name__}: "
                   f"{str(exc).splitlines()[0][:120]})",
                   hint="this is not a safetensors file, or it is corrupt") from None
    if not isinstance(header, dict):
        raise fail(f"header is a JSON {type(header).__name__}, not an object",
                   hint="this is not a safetensors file, or it is corrupt")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("__metadata__ is not a JSON object of strings")
    data_bytes = size - 8 - n
    entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
    covered = 0
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise fail(f"entry for tensor {name!r} is not a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_BITS:
            raise fail(f"tensor {name!r} has unknown dtype {dtype!r}",
                       hint=f"known dtypes: {', '.join(sorted(_DTYPE_BITS))}")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                           for d in shape)):
            raise fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                           for o in offsets) or offsets[0] > offsets[1]):
            raise fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * _DTYPE_BITS[dtype]
        begin, end = offsets
        if bits % 8 or end - begin != bits // 8:
            raise fail(f"tensor {name!r} ({dtype} {shape}) needs {bits / 8:g} bytes but its "
                       f"data_offsets {offsets} span {end - begin}")
        if end > data_bytes:
            raise fail(f"truncated: tensor {name!r} needs data bytes {begin}..{end} but the "
                       f"file holds only {data_bytes} bytes of data", hint="re-download it")
        entries[name] = (dtype, tuple(shape), end - begin)
        covered = max(covered, end)
    if covered != data_bytes:
        # The safetensors library refuses such files too; say so before any tensor is read.
        raise fail(f"the header describes {covered} data bytes but the file holds {data_bytes}",
                   hint="the header does not match the data; re-download it")
    return entries, {str(k): v for k, v in metadata.items()}, data_bytes


def _read_index(index_path: str) -> dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
    except OSError as exc:
        raise SourceError(f"cannot read index: {exc.strerror or exc}", where=index_path) from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"index is not valid JSON ({str(exc).splitlines()[0][:120]})",
                          where=index_path, hint=_REDOWNLOAD) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError("index has no 'weight_map' object", where=index_path,
                          hint="re-download the index file")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in shard:
            raise FormatError(f"weight_map maps {key!r} to an invalid file name {shard!r}",
                              where=index_path, hint="re-download the index file")
    return weight_map


def _check_shards(index_path: str, weight_map: dict[str, str]) -> list[str]:
    root = os.path.dirname(index_path)
    files = []
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(root, shard)
        if not os.path.isfile(path):
            raise FormatError(f"shard {shard!r} named in the index is missing", where=index_path,
                              hint="the download is incomplete; re-download the missing shard")
        files.append(path)
    return files


def _describe_dir(path: str) -> str:
    names = sorted(os.listdir(path))
    if not names:
        return "the directory is empty"
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    return f"found: {shown}"


class SafetensorsCheckpoint:
    """A directory of (possibly sharded) ``.safetensors`` files, or a single file.

    Headers are read and validated eagerly; tensor data is only read by :meth:`get` and
    :meth:`items`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise SourceError("checkpoint path not found", where=self.path,
                              hint="check the path or download the model first")
        weight_map: dict[str, str] | None = None
        index_path = None
        if os.path.isdir(self.path):
            files, index_path = self._discover(self.path)
            if index_path is not None:
                weight_map = _read_index(index_path)
                files = _check_shards(index_path, weight_map)
        elif os.path.isfile(self.path):
            files = [self.path]
        else:
            raise SourceError("not a file or directory", where=self.path)
        self.files: list[str] = files

        self._entries: dict[str, tuple[str, tuple[int, ...], str]] = {}
        self.metadata: dict[str, str] = {}
        self.total_bytes = 0
        for file in files:
            entries, meta, _ = _read_header(file)
            self.metadata.update(meta)
            for name, (dtype, shape, nbytes) in entries.items():
                if weight_map is not None and name in weight_map and \
                        os.path.join(os.path.dirname(index_path), weight_map[name]) != file:
                    continue  # the index decides which copy of a duplicated tensor counts
                if name in self._entries:
                    other = self._entries[name][2]
                    raise FormatError(f"tensor {name!r} appears in both {os.path.basename(other)}"
                                      f" and {os.path.basename(file)}", where=self.path,
                                      hint="remove the stray file or add an index json")
                self._entries[name] = (dtype, shape, file)
                self.total_bytes += nbytes
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self._entries:
                    raise FormatError(f"index maps tensor {name!r} to {shard!r}, which does not "
                                      f"contain it", where=index_path,
                                      hint="the index and shards disagree; re-download them")
        self._keys = sorted(self._entries)
        self._handles: dict[str, Any] = {}

    @staticmethod
    def _discover(root: str) -> tuple[list[str], str | None]:
        names = os.listdir(root)
        preferred = os.path.join(root, "model.safetensors.index.json")
        if os.path.isfile(preferred):
            return [], preferred
        indexes = sorted(n for n in names if n.endswith(".safetensors.index.json"))
        if len(indexes) == 1:
            return [], os.path.join(root, indexes[0])
        if os.path.isfile(os.path.join(root, "model.safetensors")):
            return [os.path.join(root, "model.safetensors")], None
        shards = sorted(n for n in names if n.endswith(".safetensors")
                        and os.path.isfile(os.path.join(root, n)))
        if shards:
            return [os.path.join(root, n) for n in shards], None
        legacy = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        if legacy:
            hint = "it holds PyTorch pickles: use formats.safetensors_file.load_torch_checkpoint"
        elif any(n.endswith(".gguf") for n in names):
            hint = "it holds GGUF files: use formats.gguf_file.read_gguf"
        else:
            hint = "point at a directory or file containing .safetensors weights"
        raise SourceError(f"no *.safetensors files in the directory; {_describe_dir(root)}",
                          where=root, hint=hint)

    # -- lookup ----------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def info(self, name: str) -> tuple[str, tuple[int, ...], str]:
        """(dtype string, shape, file) from the header, without reading data."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}") from None

    def _open(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(file, framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise FormatError(f"cannot open safetensors file: {exc}", where=file,
                                  hint=_REDOWNLOAD) from None
            self._handles[file] = handle
        return handle

    def _load(self, handle: Any, name: str, file: str) -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # e.g. the file changed on disk after validation
            raise FormatError(f"cannot read tensor {name!r}: {exc}", where=file,
                              hint=_REDOWNLOAD) from None

    def get(self, name: str) -> torch.Tensor:
        _, _, file = self.info(name)
        return self._load(self._open(file), name, file)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) file by file so only one shard is open at a time."""
        by_file: dict[str, list[str]] = {}
        for name in self._keys:
            by_file.setdefault(self._entries[name][2], []).append(name)
        for file in self.files:
            names = by_file.get(file)
            if not names:
                continue
            cached = file in self._handles
            handle = self._open(file)
            try:
                for name in names:
                    yield name, self._load(handle, name, file)
            finally:
                if not cached:
                    self._handles.pop(file, None)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SafetensorsCheckpoint({self.path!r}, files={len(self.files)}, "
                f"tensors={len(self._entries)})")


# -- legacy PyTorch pickles ------------------------------------------------------------

def _torch_load(path: str) -> Any:
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            # Pre-1.6 (non-zip) checkpoints cannot be memory-mapped; they still go through
            # the same restricted unpickler.
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise FormatError(
                f"file holds pickled code/objects (it references {found.group(1)}), not just "
                f"tensors; quantrt refuses to execute it", where=path,
                hint="convert it to safetensors with a tool you trust") from None
        found = re.search(r"Unsupported operand \d+", text)
        raise FormatError(
            "file is not a tensor-only PyTorch checkpoint: the restricted unpickler stopped"
            + (f" ({found.group(0)})" if found else "")
            + "; quantrt refuses to unpickle it unrestricted, since that can execute code",
            where=path, hint="re-download it, or convert it to safetensors with a tool you "
                             "trust") from None
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or exc}", where=path) from None
    except Exception as exc:  # torch reports corrupt zips/pickles with assorted types
        first = (str(exc).splitlines() or [""])[0][:200]
        raise FormatError(f"cannot read PyTorch checkpoint ({type(exc).__name__}: {first})",
                          where=path, hint=_REDOWNLOAD) from None


def _as_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    import torch

    # Training scripts often wrap the weights: {"state_dict": {...}, "epoch": 3}.
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise FormatError(f"checkpoint holds a {type(obj).__name__}, not a state_dict",
                          where=path, hint="save model.state_dict() instead of the model")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FormatError("checkpoint holds no tensors", where=path,
                          hint="save model.state_dict() instead")
    return tensors


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a legacy ``.bin``/``.pt`` state_dict (file, directory, or sharded index).

    Only the restricted ``weights_only`` unpickler is ever used, so a pickle that would
    run code is refused instead of executed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SourceError("checkpoint path not found", where=path,
                          hint="check the path or download the model first")
    if os.path.isdir(path):
        index = os.path.join(path, "pytorch_model.bin.index.json")
        single = os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(index):
            path = index
        elif os.path.isfile(single):
            path = single
        else:
            found = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth")))
            if len(found) != 1:
                raise SourceError("no single PyTorch checkpoint in the directory; "
                                  + _describe_dir(path), where=path,
                                  hint="pass the checkpoint file itself")
            path = os.path.join(path, found[0])
    if not path.endswith(".index.json"):
        return _as_state_dict(_torch_load(path), path)

    weight_map = _read_index(path)
    root = os.path.dirname(path)
    state: dict[str, torch.Tensor] = {}
    for shard_path in _check_shards(path, weight_map):
        shard = _as_state_dict(_torch_load(shard_path), shard_path)
        for name, shard_name in weight_map.items():
            if os.path.join(root, shard_name) == shard_path and name not in shard:
                raise FormatError(f"index maps tensor {name!r} to {shard_name!r}, which does not "
                                  f"contain it", where=path,
                                  hint="the index and shards disagree; re-download them")
        state.update(shard)
    return state


class TorchCheckpoint:
    """A legacy ``.bin``/``.pt`` checkpoint behind the same reading interface as
    :class:`SafetensorsCheckpoint` (loaded with ``weights_only=True``: no pickled code runs)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._tensors = load_torch_checkpoint(path)

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> tuple[str, tuple[int, ...], str]:
        t = self._tensors[name]
        return str(t.dtype).removeprefix("torch."), tuple(t.shape), self.path

    def get(self, name: str) -> "torch.Tensor":
        return self._tensors[name]

    def items(self):
        return iter(sorted(self._tensors.items()))

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def close(self) -> None:
        self._tensors = {}


def open_checkpoint(path: str | os.PathLike) -> "SafetensorsCheckpoint | TorchCheckpoint":
    """Safetensors when the directory has any; otherwise legacy pickles, loaded safely."""
    root = os.fspath(path)
    if os.path.isdir(root) and os.path.isfile(os.path.join(root, "qmodel.pt")):
        # HQQ's own save format (formats/hqq_checkpoint.py), read as safely as .bin files.
        from formats import hqq_checkpoint

        if hqq_checkpoint.is_hqq_dir(root):
            return hqq_checkpoint.HqqCheckpoint(root)
    if os.path.isdir(root):
        names = os.listdir(root)
        has_st = any(n.endswith(".safetensors") for n in names)
        has_pickle = any(n.endswith((".bin", ".pt", ".pth")) for n in names)
        if has_pickle and not has_st:
            return TorchCheckpoint(root)
    return SafetensorsCheckpoint(root)
