"""Load a model from any source: build it from its config, stream the checkpoint's tensors
into the quantization methods, then let each method repack for its kernel."""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quantrt.config import ModelConfig, from_gguf_metadata, from_hf_config
from quantrt.errors import ConfigError, FormatError, QuantrtError, UnsupportedError
from quantrt.quant.base import QuantConfig
from quantrt.quant.detect import DetectedQuant, detect_hf, read_json, resolve
from quantrt.sources import ModelSource, resolve_source

# torch, gguf and the model code are imported where they are used: the checks that
# reject bad input run first and answer in a fraction of the two seconds torch takes.
if TYPE_CHECKING:
    import torch
    from torch import nn

KERNEL_POLICIES = ("auto", "reference")
# Names of torch dtypes ("auto": float32 on CPU, the checkpoint's on GPU).
DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
# Llama 3.1+ GGUFs carry their rope scaling as per-frequency divisors in this tensor.
ROPE_FREQS = "rope_freqs.weight"
# Phi-3 GGUFs carry longrope's short/long factors as tensors (read into the config).
ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")
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
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_options(device: Any, dtype: Any, kernels: str) -> None:
    """Reject bad option values before any file is read (no torch needed)."""
    if kernels not in KERNEL_POLICIES:
        raise ConfigError(f"unknown kernel policy {kernels!r}", hint=f"one of {KERNEL_POLICIES}")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
    if isinstance(device, str) and not _DEVICE.match(device):
        raise ConfigError(f"unsupported device {device!r}", hint="use cpu, cuda or cuda:N")


def pick_device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None:
        return default_device()
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {str(dev)!r}", hint="use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(dev)!r} requested but CUDA is not available here",
                              hint="pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(dev)!r} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device, ckpt_dtype: str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32  # CPU kernels compute in fp32 outside their own inner loops
    return torch.float16 if ckpt_dtype in ("float16", "torch.float16") else torch.bfloat16


def load(source: str | os.PathLike | ModelSource, quantization: str | None = None, *,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         kernels: str = "auto", progress: bool | None = None,
         tensor_parallel: Any = None) -> LoadedModel:
    """Load a (quantized) model and its tokenizer.

    ``kernels="reference"`` forces the exact torch reference path of every method.
    ``tensor_parallel``: a :class:`~quantrt.parallel.comm.TPGroup`; this process then keeps
    only its rank's part of every layer (see :mod:`quantrt.parallel`).
    """
    src = source if isinstance(source, ModelSource) else resolve_source(source)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        check_options(device, dtype, kernels)
        if src.kind == "gguf":
            return _load_gguf(src, quantization, device, dtype, kernels, show, tensor_parallel)
        return _load_hf(src, quantization, device, dtype, kernels, show, tensor_parallel)
    except QuantrtError as exc:
        if exc.where is not None:
            raise
        # Every error names the model it is about, even where the raiser did not know it.
        raise type(exc)(exc.message, where=str(src.path), hint=exc.hint) from None


def _progress(items: Iterator, total: int, desc: str, show: bool) -> Iterator:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False)


def _checkpoint_name(model: nn.Module, prefix: str, tensor: str, shard: int) -> str:
    """The checkpoint's name for shard ``shard`` of a fused layer (users never saw ours)."""
    head, _, last = prefix.rpartition(".")
    for unfused, (fused, index) in getattr(model, "packed_modules", {}).items():
        if fused == last and index == shard:
            return f"{head}.{unfused}.{tensor}" if head else f"{unfused}.{tensor}"
    return f"{prefix}.{tensor}" + (f" (shard {shard})" if shard else "")


def _finish(model: nn.Module, dev: torch.device, where: str, tie: bool,
            file_name: Any = None, tp: Any = None) -> None:
    """Check every tensor arrived, then repack each layer for its kernel on ``dev``.
    A tied lm_head is attached to the embedding after the embedding reached ``dev`` so
    that both share one copy.  ``file_name`` maps an HF tensor name to the file's own."""
    missing = []
    for module in model.modules():
        tracker = getattr(module, "tracker", None)
        if tracker is not None and not (tie and module is model.lm_head):
            missing += [_checkpoint_name(model, module.prefix, t, s) for t, s in tracker.missing()]
    if file_name is not None:
        missing = [file_name(n) for n in missing]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FormatError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}", where=where,
                          hint="the file is incomplete or not for this architecture")
    done: set[int] = set()
    if tp is not None and tp.size > 1:
        from quantrt.parallel.shard import shard_layers, shard_vocab

        try:
            shard_vocab(model, tp, tie)
            for cut in shard_layers(model, tp):   # cut, then repack, one layer at a time
                for module in cut:
                    module.process_weights_after_loading(dev)
                    done.add(id(module))
        except ValueError as exc:
            raise ConfigError(f"cannot split the model over {tp.size} ranks: {exc}",
                              where=where) from None
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading") and id(module) not in done \
                and not (tie and module is model.lm_head):
            module.process_weights_after_loading(dev)
    if tie:
        model.lm_head.method.tie_to(model.lm_head, model.embed_tokens)
        model.lm_head.process_weights_after_loading(dev)
    model.rotaries.to(dev)


def _load_one(model: nn.Module, name: str, tensor: Any, where: str) -> None:
    target = model.resolve(name)
    if target is None:
        raise FormatError(f"unexpected tensor {name!r} for a {model.cfg.architecture} model",
                          where=where, hint="the checkpoint does not match its config")
    module, tname, shard = target
    try:
        module.load(tname, tensor, shard)
    except QuantrtError as exc:
        # Layers speak of fused names (gate_up_proj shard 1); the user knows up_proj.
        message = exc.message if name in exc.message else f"{name}: {exc.message}"
        raise type(exc)(message, where=exc.where or where, hint=exc.hint) from None


# -- GGUF ------------------------------------------------------------------------------------
def unpermute_qk(data: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (it interleaves the two rotary halves of every
    head so that it can rotate adjacent pairs); HF and our rotary rotate halves."""
    rows = data.shape[0]
    rest = data.shape[1:]
    return data.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _gguf_names(cfg: ModelConfig, where: str) -> Any:
    """gguf-py's HF <-> GGUF tensor name map for ``cfg``'s architecture."""
    import gguf

    # llama.cpp writes Mistral as "llama"; a file saying "mistral" uses the same tensor names,
    # and gguf-py has no MODEL_ARCH.MISTRAL to look them up under.
    tensor_arch = {"mistral": "llama"}.get(cfg.architecture, cfg.architecture)
    try:
        arch = gguf.MODEL_ARCH[tensor_arch.upper()]
    except KeyError:
        raise UnsupportedError(f"gguf-py has no tensor names for architecture {cfg.architecture!r}",
                               where=where) from None
    return gguf.get_tensor_name_map(arch, cfg.num_layers)


def _gguf_tensors(gf: Any, model: nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, Any]]:
    from quantrt.quant.ggml_kernels import FLOAT_TYPES, GGMLTensor

    names = _gguf_names(cfg, gf.path)
    reverse = {names.get_name(hf): hf for hf in model.checkpoint_module_names()}
    permute = cfg.architecture in ("llama", "mistral")
    for gname, info in gf.tensors.items():
        if gname == ROPE_FREQS:
            model.rotary.set_freq_factors(gf.tensor(gname).float())
            continue
        if gname in ROPE_FACTORS:
            continue  # already in cfg.rope
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


def _load_gguf(src: ModelSource, quantization: str | None, device: Any, dtype: Any,
               kernels: str, show: bool, tp: Any = None) -> LoadedModel:
    from formats.gguf_file import read_gguf

    gf = read_gguf(src.path)
    factors = None
    if any(n in gf.tensors for n in ROPE_FACTORS):
        if not all(n in gf.tensors for n in ROPE_FACTORS):
            raise FormatError(f"GGUF has only one of {', '.join(ROPE_FACTORS)}", where=src.path)
        factors = tuple(gf.tensor(n).float().reshape(-1).tolist() for n in ROPE_FACTORS)
    cfg = from_gguf_metadata(gf.metadata, str(src.path), factors)
    tie = "output.weight" not in gf.tensors
    if tie != cfg.tie_word_embeddings:
        cfg = ModelConfig(**{**cfg.__dict__, "tie_word_embeddings": tie})
    types = {n: t.type_name for n, t in gf.tensors.items()}
    detected = DetectedQuant("gguf", {"file_type": gf.get("general.file_type"), "tensor_types": types},
                             str(src.path))
    qc = resolve(detected, quantization, str(src.path))
    qc.policy = kernels

    from quantrt.models import build_model
    from quantrt.tokenizer import Tokenizer

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev, cfg.checkpoint_dtype)
    model = build_model(cfg, qc, torch_dtype)
    for name, tensor in _progress(_gguf_tensors(gf, model, cfg), len(gf.tensors), "loading", show):
        _load_one(model, name, tensor, str(src.path))
    names = _gguf_names(cfg, str(src.path))

    def gguf_name(hf: str) -> str:
        base, _, suffix = hf.rpartition(".")
        found = names.get_name(base)
        return f"{found}.{suffix}" if found else hf

    _finish(model, dev, str(src.path), tie, gguf_name, tp)
    tok = Tokenizer.from_gguf_metadata(gf.metadata, str(src.path))
    return LoadedModel(model.eval(), cfg, qc, tok, src, dev, torch_dtype, detected,
                       os.path.getsize(src.path), [gf])


# -- HF directories --------------------------------------------------------------------------
def _load_hf(src: ModelSource, quantization: str | None, device: Any, dtype: Any,
             kernels: str, show: bool, tp: Any = None) -> LoadedModel:
    from formats.safetensors_file import open_checkpoint

    cfg_path = os.path.join(src.path, "config.json")
    raw_cfg = read_json(cfg_path)
    cfg = from_hf_config(raw_cfg, cfg_path)
    detected = detect_hf(str(src.path), raw_cfg)
    ckpt = open_checkpoint(src.path)  # safetensors: headers only, catches truncation early
    qc = resolve(detected, quantization, str(src.path))
    qc.policy = kernels

    from quantrt.models import build_model
    from quantrt.tokenizer import Tokenizer

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev, cfg.checkpoint_dtype)
    model = build_model(cfg, qc, torch_dtype)
    keys = ckpt.keys()
    tie = cfg.tie_word_embeddings or not any(model.canonical_name(n) == "lm_head.weight"
                                             for n in keys)
    for name, tensor in _progress(ckpt.items(), len(keys), "loading", show):
        ours = model.canonical_name(name)
        if ours is None or ours.endswith(HF_IGNORED_SUFFIXES) or (tie and ours == "lm_head.weight"):
            continue
        _load_one(model, ours, tensor, ckpt.info(name)[2])
    _finish(model, dev, str(src.path), tie, tp=tp)
    tok = Tokenizer.from_pretrained_dir(str(src.path))
    return LoadedModel(model.eval(), cfg, qc, tok, src, dev, torch_dtype, detected,
                       ckpt.total_bytes, [ckpt])
