"""Load a model from any source: build it from its config, stream the checkpoint's tensors
into the quantization methods, then let each method repack for its kernel."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import gguf
import torch
from torch import nn

from quantrt.config import ModelConfig, from_gguf_metadata, from_hf_config
from quantrt.errors import FormatError, QuantrtError
from quantrt.models import build_model
from quantrt.quant.base import QuantConfig
from quantrt.quant.detect import DetectedQuant, detect_hf, read_json, resolve
from quantrt.quant.ggml_kernels import FLOAT_TYPES, GGMLTensor
from quantrt.sources import ModelSource, resolve_source

KERNEL_POLICIES = ("auto", "reference")
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
# GGUF tensors that carry no weights of their own for our models.
GGUF_IGNORED = {"rope_freqs.weight"}
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    quant_config: QuantConfig
    tokenizer: Any
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    detected: DetectedQuant
    file_bytes: int
    keepalive: list[Any] = field(default_factory=list)  # open files whose memory maps back weights


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device, ckpt_dtype: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise QuantrtError(f"unknown dtype {dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # CPU kernels compute in fp32 outside their own inner loops
    return torch.float16 if ckpt_dtype in ("float16", "torch.float16") else torch.bfloat16


def load(source: str | os.PathLike | ModelSource, quantization: str | None = None, *,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         kernels: str = "auto", progress: bool | None = None) -> LoadedModel:
    """Load a (quantized) model and its tokenizer.

    ``kernels="reference"`` forces the exact torch reference path of every method.
    """
    if kernels not in KERNEL_POLICIES:
        raise QuantrtError(f"unknown kernel policy {kernels!r}", hint=f"one of {KERNEL_POLICIES}")
    src = source if isinstance(source, ModelSource) else resolve_source(source)
    dev = torch.device(device) if device is not None else default_device()
    show = sys.stderr.isatty() if progress is None else progress
    if src.kind == "gguf":
        return _load_gguf(src, quantization, dev, dtype, kernels, show)
    return _load_hf(src, quantization, dev, dtype, kernels, show)


def _progress(items: Iterator, total: int, desc: str, show: bool) -> Iterator:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False)


def _finish(model: nn.Module, dev: torch.device, where: str, tie: bool) -> None:
    """Check every tensor arrived, then repack each layer for its kernel on ``dev``.
    A tied lm_head is attached to the embedding after the embedding reached ``dev`` so
    that both share one copy."""
    missing = []
    for module in model.modules():
        tracker = getattr(module, "tracker", None)
        if tracker is not None and not (tie and module is model.lm_head):
            missing += [f"{module.prefix}.{t}" + (f" (shard {s})" if s else "")
                        for t, s in tracker.missing()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FormatError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}", where=where,
                          hint="the file is incomplete or not for this architecture")
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading") and not (tie and module is model.lm_head):
            module.process_weights_after_loading(dev)
    if tie:
        model.lm_head.method.tie_to(model.lm_head, model.embed_tokens)
        model.lm_head.process_weights_after_loading(dev)
    model.rotary.to(dev)


def _load_one(model: nn.Module, name: str, tensor: Any, where: str) -> None:
    target = model.resolve(name)
    if target is None:
        raise FormatError(f"unexpected tensor {name!r} for a {model.cfg.architecture} model",
                          where=where, hint="the checkpoint does not match its config")
    module, tname, shard = target
    try:
        module.load(tname, tensor, shard)
    except QuantrtError as exc:
        if exc.where is None:
            exc = type(exc)(exc.message, where=where, hint=exc.hint)
        raise exc from None


# -- GGUF ------------------------------------------------------------------------------------
def unpermute_qk(data: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (it interleaves the two rotary halves of every
    head so that it can rotate adjacent pairs); HF and our rotary rotate halves."""
    rows = data.shape[0]
    rest = data.shape[1:]
    return data.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _gguf_tensors(gf: Any, model: nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, Any]]:
    arch = gguf.MODEL_ARCH[cfg.architecture.upper()]
    names = gguf.get_tensor_name_map(arch, cfg.num_layers)
    reverse = {names.get_name(hf): hf for hf in model.checkpoint_module_names()}
    permute = cfg.architecture in ("llama", "mistral")
    for gname, info in gf.tensors.items():
        if gname in GGUF_IGNORED:
            continue
        base, _, suffix = gname.rpartition(".")
        hf = reverse.get(base)
        if hf is None:
            raise FormatError(f"GGUF tensor {gname!r} is not part of a {cfg.architecture} model",
                              where=gf.path)
        data = gf.tensor(gname)
        if permute and suffix == "weight" and hf.endswith(("q_proj", "k_proj")):
            heads = cfg.num_heads if hf.endswith("q_proj") else cfg.num_kv_heads
            data = unpermute_qk(data, heads)
        if len(info.shape) == 2:
            yield f"{hf}.{suffix}", GGMLTensor(data, info.ggml_type, tuple(info.shape))
        elif info.ggml_type in FLOAT_TYPES:
            yield f"{hf}.{suffix}", data.reshape(info.shape).float()
        else:
            yield f"{hf}.{suffix}", GGMLTensor(data, info.ggml_type, (1, info.shape[0])).to_float()[0]


def _load_gguf(src: ModelSource, quantization: str | None, dev: torch.device, dtype: Any,
               kernels: str, show: bool) -> LoadedModel:
    from formats.gguf_file import read_gguf
    from quantrt.tokenizer import Tokenizer

    gf = read_gguf(src.path)
    cfg = from_gguf_metadata(gf.metadata, str(src.path))
    tie = "output.weight" not in gf.tensors
    if tie != cfg.tie_word_embeddings:
        cfg = ModelConfig(**{**cfg.__dict__, "tie_word_embeddings": tie})
    types = {n: gguf.GGMLQuantizationType(t.ggml_type).name for n, t in gf.tensors.items()}
    detected = DetectedQuant("gguf", {"file_type": gf.get("general.file_type"), "tensor_types": types},
                             str(src.path))
    qc = resolve(detected, quantization)
    qc.policy = kernels
    torch_dtype = pick_dtype(dtype, dev, cfg.checkpoint_dtype)
    model = build_model(cfg, qc, torch_dtype)
    for name, tensor in _progress(_gguf_tensors(gf, model, cfg), len(gf.tensors), "loading", show):
        _load_one(model, name, tensor, str(src.path))
    _finish(model, dev, str(src.path), tie)
    tok = Tokenizer.from_gguf_metadata(gf.metadata, str(src.path))
    return LoadedModel(model.eval(), cfg, qc, tok, src, dev, torch_dtype, detected,
                       os.path.getsize(src.path), [gf])


# -- HF directories --------------------------------------------------------------------------
def _load_hf(src: ModelSource, quantization: str | None, dev: torch.device, dtype: Any,
             kernels: str, show: bool) -> LoadedModel:
    from formats.safetensors_file import SafetensorsCheckpoint
    from quantrt.tokenizer import Tokenizer

    cfg_path = os.path.join(src.path, "config.json")
    raw_cfg = read_json(cfg_path)
    cfg = from_hf_config(raw_cfg, cfg_path)
    detected = detect_hf(str(src.path), raw_cfg)
    qc = resolve(detected, quantization)
    qc.policy = kernels
    ckpt = SafetensorsCheckpoint(src.path)
    torch_dtype = pick_dtype(dtype, dev, cfg.checkpoint_dtype)
    model = build_model(cfg, qc, torch_dtype)
    tie = cfg.tie_word_embeddings or "lm_head.weight" not in ckpt
    keys = ckpt.keys()
    for name, tensor in _progress(ckpt.items(), len(keys), "loading", show):
        if name.endswith(HF_IGNORED_SUFFIXES) or (tie and name == "lm_head.weight"):
            continue
        _load_one(model, name, tensor, ckpt.file_of(name) if hasattr(ckpt, "file_of") else str(src.path))
    _finish(model, dev, str(src.path), tie)
    tok = Tokenizer.from_pretrained_dir(str(src.path))
    return LoadedModel(model.eval(), cfg, qc, tok, src, dev, torch_dtype, detected,
                       ckpt.total_bytes, [ckpt])
