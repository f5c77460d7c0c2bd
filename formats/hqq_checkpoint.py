"""HQQ's own save format (``AutoHQQHFModel.save_quantized``): a directory with config.json
(no quantization_config) and ``qmodel.pt``, a torch pickle of ``{module name: state dict}``.

Quantized modules hold ``HQQLinear`` state dicts: tensors ``W_q``, ``scale``, ``zero``
(and ``bias``) next to plain metadata (``nbits`` int, ``packing`` str, ``shape``
torch.Size, ``compute_dtype`` torch.dtype, bools).  Older hqq releases nest that metadata
under a ``meta`` dict.  Other modules (embeddings, norms, skipped linears) hold ``weight``.

The file is only ever read with ``torch.load(weights_only=True)`` (through
:func:`formats.safetensors_file._torch_load`), so a pickle that references code is refused.
:class:`HqqCheckpoint` flattens it into ``(name, tensor)`` pairs such as
``model.layers.0.self_attn.q_proj.W_q``, with every metadata value encoded as a small
tensor the way hqq encodes it for safetensors (ints int32, bools uint8, strings and
dtypes as uint8 character codes, sizes int64), so that HQQ layers read the same names
whether they come from ``qmodel.pt`` or from a transformers-HQQ safetensors export.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from formats import hqq
from formats.safetensors_file import TorchCheckpoint, _torch_load
from quantrt.errors import FormatError, UnsupportedError

QMODEL = "qmodel.pt"
# Plain values hqq stores next to the tensors of a layer (torch.load(weights_only=True)
# rebuilds exactly these types; anything else in the file is refused).
_META_TYPES = (bool, int, float, str, torch.Size, torch.dtype, type(None))
# Deprecated hqq options that store the scale/zero themselves quantized.
_QUANTIZED_META = ("meta_scale", "meta_zero", "zero_q", "scale_q", "zero_scale")


def is_hqq_dir(root: str | os.PathLike) -> bool:
    """A directory whose weights are HQQ's qmodel.pt (other safetensors files in it, such
    as a stray reference file, do not count as weights unless named like model weights)."""
    root = os.fspath(root)
    if not os.path.isfile(os.path.join(root, QMODEL)):
        return False
    names = os.listdir(root)
    return "model.safetensors" not in names and not any(
        n.endswith(".safetensors.index.json") for n in names)


def read_qmodel(path: str) -> dict[str, dict[str, Any]]:
    """``{module: {key: tensor or plain value}}`` from qmodel.pt, checked for shape: every
    value of every module is a tensor or one of hqq's metadata types."""
    obj = _torch_load(path)
    if not isinstance(obj, dict) or not obj:
        raise FormatError(f"{QMODEL} holds a {type(obj).__name__}, not HQQ's "
                          f"{{module name: state dict}}", where=path,
                          hint="save it with AutoHQQHFModel.save_quantized")
    out: dict[str, dict[str, Any]] = {}
    for module, state in obj.items():
        if not isinstance(module, str) or not isinstance(state, dict):
            raise FormatError(f"{QMODEL} entry {module!r} is a {type(state).__name__}, not a "
                              f"module state dict", where=path)
        flat: dict[str, Any] = {}
        # Older hqq nests the metadata under "meta"; newer writes it at the top level.
        for key, value in [*state.items(), *(state.get("meta") or {}).items()]:
            if key == "meta" and isinstance(value, dict):
                continue
            if key in _QUANTIZED_META:
                raise UnsupportedError(f"HQQ layer {module} stores its scale/zero quantized "
                                       f"({key}); hqq deprecated that and quantrt does not "
                                       f"support it", where=path)
            if not isinstance(key, str) or not isinstance(value, (torch.Tensor, *_META_TYPES)):
                raise FormatError(f"{QMODEL} entry {module}.{key} is a {type(value).__name__}; "
                                  f"expected a tensor or HQQ metadata (int, str, bool, "
                                  f"torch.Size, torch.dtype)", where=path,
                                  hint="the file was not written by hqq; re-export it")
            flat[key] = value.data if isinstance(value, torch.nn.Parameter) else value
        out[module] = flat
    return out


def encode_meta(value: Any) -> torch.Tensor | None:
    """A metadata value as the small tensor hqq writes for safetensors (None: dropped)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, torch.Size):
        return torch.tensor(list(value), dtype=torch.int64)
    if isinstance(value, torch.dtype):
        value = str(value)
    if isinstance(value, bool):
        return torch.tensor(int(value), dtype=torch.uint8)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int32)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float32)
    return torch.tensor([ord(c) for c in value], dtype=torch.uint8)


def decode_meta(t: torch.Tensor, kind: type) -> Any:
    """The inverse of :func:`encode_meta` for ``kind`` in (int, float, bool, str, tuple)."""
    if kind is str:
        return "".join(chr(int(c)) for c in t.reshape(-1).tolist())
    if kind is tuple:
        return tuple(int(v) for v in t.reshape(-1).tolist())
    if t.numel() != 1:
        raise ValueError(f"expected one value, got shape {tuple(t.shape)}")
    v = t.reshape(-1)[0].item()
    return bool(v) if kind is bool else (int(v) if kind is int else float(v))


def linear_tag(name: str) -> str:
    """transformers' HQQ layer tag: the name without ``model``, ``layers`` and indices
    (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``)."""
    return ".".join(p for p in name.split(".") if p not in ("model", "layers") and not p.isdigit())


def _layer_params(module: str, state: dict[str, Any], path: str) -> dict[str, Any]:
    try:
        meta = hqq.parse_layer(state)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"HQQ layer {module}: unreadable metadata ({exc})", where=path) from None
    except FormatError as exc:
        raise FormatError(f"{module}: {exc.message}", where=path, hint=exc.hint) from None
    for flag in ("quant_scale", "quant_zero"):
        if state.get(flag):
            raise UnsupportedError(f"HQQ layer {module} has {flag}=True (quantized meta-data, "
                                   f"deprecated by hqq); not supported", where=path)
    group = meta["group_size"]
    if group is not None and len(meta["shape"]) == 2 and group == meta["shape"][meta["axis"]]:
        group = None  # hqq records "no groups" as one group per row (axis 1) / column (0)
    return {"nbits": meta["nbits"], "group_size": group, "axis": meta["axis"],
            "view_as_float": meta["view_as_float"]}


def _describe(params: dict[str, Any] | None) -> str:
    if params is None:
        return "not quantized"
    return " ".join(f"{k}={v}" for k, v in params["weight_quant_params"].items())


def detect_settings(root: str | os.PathLike) -> dict[str, Any] | None:
    """The quantization settings of an HQQ directory, in transformers' HQQ form
    (``quant_config`` + ``skip_modules``), read from the per-layer metadata, or None when
    qmodel.pt holds no HQQ layer.  Layers of one kind (linear tag) must agree."""
    path = os.path.join(os.fspath(root), QMODEL)
    qmodel = read_qmodel(path)
    by_tag: dict[str, Any] = {}
    skipped: set[str] = set()
    for module, state in qmodel.items():
        tag = linear_tag(module)
        if "W_q" in state:
            params = {"weight_quant_params": _layer_params(module, state, path)}
        elif isinstance(state.get("weight"), torch.Tensor) and state["weight"].ndim == 2:
            params = None  # a float linear or embedding: not quantized
            skipped.add(tag)
        else:
            continue  # norms and other non-linear modules
        if tag in by_tag and by_tag[tag] != params:
            raise UnsupportedError(f"HQQ layers of kind {tag!r} use different settings "
                                   f"({_describe(by_tag[tag])} vs {_describe(params)} at "
                                   f"{module})", where=path,
                                   hint="quantrt reads one setting per layer kind, as "
                                        "transformers' HQQ config does")
        by_tag[tag] = params
    quantized = {t: p for t, p in by_tag.items() if p is not None}
    if not quantized:
        return None
    distinct = {repr(p) for p in quantized.values()}
    quant_config = next(iter(quantized.values())) if len(distinct) == 1 else by_tag
    return {"quant_method": "hqq", "quant_config": quant_config,
            "skip_modules": sorted(skipped), "checkpoint": QMODEL}


class HqqCheckpoint(TorchCheckpoint):
    """qmodel.pt behind the reading interface of the safetensors checkpoints (the in-memory
    tensor dict of :class:`TorchCheckpoint`, filled from HQQ's per-layer states)."""

    def __init__(self, root: str | os.PathLike) -> None:  # not super(): that reads .bin files
        self.root = os.fspath(root)
        self.path = os.path.join(self.root, QMODEL)
        self._tensors: dict[str, torch.Tensor] = {}
        for module, state in read_qmodel(self.path).items():
            for key, value in state.items():
                t = encode_meta(value)
                if t is not None:
                    self._tensors[f"{module}.{key}"] = t

    @property
    def total_bytes(self) -> int:
        return os.path.getsize(self.path)

    def __repr__(self) -> str:
        return f"HqqCheckpoint({self.path!r}, tensors={len(self._tensors)})"
