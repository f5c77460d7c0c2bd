"""A validating, zero-copy GGUF reader.

We parse the header ourselves instead of using ``gguf.GGUFReader`` so that every kind of
corruption (truncated downloads, hand-edited headers, files of another format) surfaces
as one actionable :class:`FormatError` rather than a struct/numpy traceback, and so that
metadata parsing stays fast on vocabularies of 150k tokens.  Only constants and enums
are taken from the ``gguf`` package.

Layout (v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
kv pairs, tensor infos, padding to ``general.alignment``, tensor data.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from quantrt.errors import FormatError, SourceError

if TYPE_CHECKING:  # imported in tensor(): validating a header should not cost torch's 2 s
    import torch

__all__ = ["GGUFTensorInfo", "GGUFFile", "read_gguf"]

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_HEADER_BYTES = 24          # magic + version + tensor_count + kv_count
_MIN_TENSOR_INFO_BYTES = 24  # really >= 32 (len+n_dims+1 dim+type+offset); 24 is a safe bound
_MIN_KV_BYTES = 12           # key length + value type
_MAX_DIMS = 4               # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 8      # nested arrays are legal but never deep; bounds recursion
_DEFAULT_ALIGNMENT = 32
_CORRUPT_HINT = ("the file is corrupt or was not written by a GGUF converter; "
                 "re-download or re-convert it")

# struct format and numpy dtype for each scalar value type.
_SCALARS: dict[int, tuple[str, str]] = {
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.BOOL: ("<?", "<u1"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}

# Element types that raw() exposes as typed arrays; everything else is block-quantized
# and exposed as bytes.  BF16 has no numpy dtype, so it is viewed as uint16.
_TYPED: dict[int, str] = {
    GGMLQuantizationType.F32: "<f4",
    GGMLQuantizationType.F16: "<f2",
    GGMLQuantizationType.BF16: "<u2",
    GGMLQuantizationType.I8: "<i1",
    GGMLQuantizationType.I16: "<i2",
    GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8",
    GGMLQuantizationType.F64: "<f8",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (numpy/torch) order: ggml `ne` reversed
    ggml_type: int
    offset: int             # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)][0]

    @property
    def row_bytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.shape[-1] // block * type_size


class _HeaderParser:
    """Bounds-checked cursor over the mapped file; every read names what it was reading."""

    def __init__(self, path: str, buf: memoryview, size: int) -> None:
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, message: str, hint: str = _CORRUPT_HINT) -> FormatError:
        return FormatError(message, where=self.path, hint=hint)

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.fail(f"header truncated: {what} needs {n} bytes at offset {self.pos} "
                            f"but the file has {self.size} bytes")

    def scalar(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if self.pos + n > self.size:
            raise self.fail(f"string length {n} of {what} at offset {self.pos - 8} runs past "
                            f"the end of the file ({self.size} bytes)")
        text = str(self.buf[self.pos:self.pos + n], "utf-8", "replace")
        self.pos += n
        return text

    def string_array(self, count: int, what: str) -> list[str]:
        # Hot path for tokenizer vocabularies: avoid per-item method calls.
        buf, size, pos, unpack = self.buf, self.size, self.pos, struct.unpack_from
        out: list[str] = [""] * count
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of item {i} of {what}")
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            if pos + n > size:
                raise self.fail(f"string length {n} of item {i} of {what} at offset {pos - 8} "
                                f"runs past the end of the file ({size} bytes)")
            out[i] = str(buf[pos:pos + n], "utf-8", "replace")
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype in _SCALARS:
            fmt, _ = _SCALARS[vtype]
            return self.scalar(fmt, struct.calcsize(fmt), what)
        if vtype != GGUFValueType.ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth >= _MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
        item_type = self.u32(f"item type of {what}")
        count = self.u64(f"item count of {what}")
        if item_type == GGUFValueType.STRING:
            min_item = 8
        elif item_type == GGUFValueType.ARRAY:
            min_item = 12
        elif item_type in _SCALARS:
            min_item = struct.calcsize(_SCALARS[item_type][0])
        else:
            raise self.fail(f"{what} is an array of unknown value type {item_type}")
        if count * min_item > self.size - self.pos:
            raise self.fail(f"{what} claims {count} items, more than the remaining "
                            f"{self.size - self.pos} bytes of the file can hold")
        if item_type == GGUFValueType.STRING:
            return self.string_array(count, what)
        if item_type == GGUFValueType.ARRAY:
            return [self.value(item_type, f"item {i} of {what}", depth + 1) for i in range(count)]
        arr = np.frombuffer(self.buf, dtype=_SCALARS[item_type][1], count=count, offset=self.pos)
        self.pos += count * min_item
        if item_type == GGUFValueType.BOOL:
            return [bool(x) for x in arr.tolist()]
        return arr.tolist()


class GGUFFile:
    """An open GGUF file: parsed metadata, tensor table and zero-copy tensor views.

    The file is mapped copy-on-write, so tensors returned by :meth:`raw`/:meth:`tensor`
    are writable without ever touching the file (an in-place op on a read-only mapping
    would crash the process instead of raising).  Views stay valid after :meth:`close`
    because each one holds a reference to the mapping.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._mm: np.memmap | None = None
        if not os.path.exists(self.path):
            raise SourceError("GGUF file not found", where=self.path,
                              hint="check the path or download the model first")
        if not os.path.isfile(self.path):
            found = sorted(f for f in os.listdir(self.path) if f.endswith(".gguf")) \
                if os.path.isdir(self.path) else []
            hint = (f"pass one of the .gguf files inside it: {', '.join(found[:5])}" if found
                    else "pass the path of a .gguf file")
            raise FormatError("not a regular file", where=self.path, hint=hint)
        try:
            self.file_size = os.path.getsize(self.path)
            if self.file_size < 4:
                raise FormatError(f"file is {self.file_size} bytes, shorter than the "
                                  f"{_HEADER_BYTES}-byte GGUF header", where=self.path,
                                  hint="the download is incomplete or the file is not GGUF")
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="c")
        except OSError as exc:
            raise SourceError(f"cannot read file: {exc.strerror or exc}", where=self.path,
                              hint="check file permissions") from None
        self._parse()

    # -- parsing ---------------------------------------------------------------------

    def _parse(self) -> None:
        buf = memoryview(self._mm)
        try:
            self._parse_header(_HeaderParser(self.path, buf, self.file_size))
        finally:
            buf.release()

    def _parse_header(self, p: _HeaderParser) -> None:
        magic = bytes(p.buf[:4])
        if magic != _MAGIC:
            raise p.fail(f"bad magic: the file starts with {magic!r}, but a GGUF file starts "
                         f"with b'GGUF'", hint="this is not a GGUF file, or it is corrupt")
        if p.size < _HEADER_BYTES:
            raise p.fail(f"file is {p.size} bytes, shorter than the {_HEADER_BYTES}-byte GGUF "
                         f"header", hint="the download is incomplete; re-download it")
        p.pos = 4
        version = p.u32("version")
        if version not in _SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (1, 2, 3):
                raise p.fail(f"big-endian GGUF (version {swapped}) is not supported",
                             hint="convert it to little-endian with gguf-py's "
                                  "gguf_convert_endian.py")
            raise p.fail(f"unsupported GGUF version {version} (supported: 2, 3)",
                         hint="re-convert the model with a current llama.cpp/gguf-py")
        self.version = version
        tensor_count = p.u64("tensor_count")
        kv_count = p.u64("kv_count")
        room = p.size - _HEADER_BYTES
        if tensor_count > room // _MIN_TENSOR_INFO_BYTES:
            raise p.fail(f"absurd tensor_count {tensor_count}: a {p.size}-byte file can hold at "
                         f"most {room // _MIN_TENSOR_INFO_BYTES} tensor infos")
        if kv_count > room // _MIN_KV_BYTES:
            raise p.fail(f"absurd kv_count {kv_count}: a {p.size}-byte file can hold at most "
                         f"{room // _MIN_KV_BYTES} metadata entries")

        metadata: dict[str, Any] = {}
        for i in range(kv_count):
            key = p.string(f"key of metadata entry {i}")
            vtype = p.u32(f"value type of key {key!r}")
            if key in metadata:
                raise p.fail(f"duplicate metadata key {key!r}")
            metadata[key] = p.value(vtype, f"key {key!r}")
        self.metadata = metadata

        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
                or alignment & (alignment - 1)):
            raise p.fail(f"general.alignment is {alignment!r}, not a power of two")
        self.alignment = alignment

        pending = [self._parse_tensor_info(p, i) for i in range(tensor_count)]
        self.data_offset = -(-p.pos // alignment) * alignment

        tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, rel_offset, nbytes in pending:
            if name in tensors:
                raise p.fail(f"duplicate tensor name {name!r}")
            if rel_offset % alignment:
                raise p.fail(f"tensor {name!r} data offset {rel_offset} is not a multiple of "
                             f"the alignment {alignment}")
            start = self.data_offset + rel_offset
            end = start + nbytes
            if end > p.size:
                raise p.fail(f"truncated: tensor {name!r} needs bytes {start}..{end} but the "
                             f"file has {p.size} bytes", hint="re-download it")
            tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, nbytes)
        self.tensors = tensors

    def _parse_tensor_info(self, p: _HeaderParser, i: int) -> tuple:
        name = p.string(f"name of tensor {i}")
        what = f"tensor {name!r}"
        n_dims = p.u32(f"n_dims of {what}")
        if n_dims == 0 or n_dims > _MAX_DIMS:
            raise p.fail(f"{what} has {n_dims} dimensions (GGUF allows 1..{_MAX_DIMS})")
        p.need(8 * n_dims, f"dimensions of {what}")
        ne = struct.unpack_from(f"<{n_dims}Q", p.buf, p.pos)
        p.pos += 8 * n_dims
        ggml_type = p.u32(f"type of {what}")
        rel_offset = p.u64(f"data offset of {what}")
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise p.fail(f"{what} has unknown ggml type {ggml_type}",
                         hint="the file needs a newer runtime, or it is corrupt") from None
        n_elements = 1
        for d in ne:
            n_elements *= d
        if 0 in ne:
            raise p.fail(f"{what} has a zero dimension (ne={list(ne)})")
        # No ggml type packs more than ~7 elements per byte, so more than 8 per file byte
        # cannot be real data: it is a corrupt dimension, not a short download.
        if n_elements > 8 * p.size:
            raise p.fail(f"{what} has an absurd shape ne={list(ne)} (more elements than the "
                         f"file could hold)")
        if ne[0] % block:
            raise p.fail(f"{what} of type {qtype.name} has rows of {ne[0]} elements, not a "
                         f"multiple of the block size {block}")
        nbytes = n_elements // block * type_size
        return name, tuple(reversed(ne)), ggml_type, rel_offset, nbytes

    # -- access ----------------------------------------------------------------------

    def _info(self, name: str) -> GGUFTensorInfo:
        if self._mm is None:
            raise ValueError(f"{self.path}: GGUF file is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view of a tensor's data.

        Block-quantized types: uint8 array shaped ``(*shape[:-1], row_bytes)``.
        Element types: a typed array shaped ``shape``; BF16 is returned as uint16 bits.
        """
        info = self._info(name)
        dtype = _TYPED.get(info.ggml_type)
        if dtype is None:
            shape, dtype = (*info.shape[:-1], info.row_bytes), np.uint8
        else:
            shape = info.shape
        return np.ndarray(shape, dtype=dtype, buffer=self._mm, offset=info.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """``torch.from_numpy(raw(name))`` without a copy; BF16 comes back as torch.bfloat16."""
        import torch

        t = torch.from_numpy(self.raw(name))
        if self.tensors[name].ggml_type == GGMLQuantizationType.BF16:
            t = t.view(torch.bfloat16)
        return t

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def close(self) -> None:
        # Dropping our reference is enough: views handed out keep the mapping alive and
        # it is unmapped when the last one goes.
        self._mm = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, "
                f"tensors={len(self.tensors)}, kv={len(self.metadata)})")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; raises FormatError/SourceError on bad input."""
    return GGUFFile(path)
