"""What ``quantrt inspect`` reports: architecture, quantization, tensor types, memory and
the kernel each layer type runs on this machine (with the reasons faster ones refused)."""
from __future__ import annotations

import collections
import re
from typing import Any

import torch

from quantrt.loader import LoadedModel
from quantrt.quant.base import layer_tensors


def _layer_kind(prefix: str) -> str:
    return re.sub(r"^model\.layers\.\d+\.", "", prefix)


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def tensor_type_counts(lm: LoadedModel) -> dict[str, int]:
    if lm.source.kind == "gguf":
        types = lm.detected.settings.get("tensor_types", {})
        return dict(collections.Counter(types.values()).most_common())
    ckpt = lm.keepalive[0]
    return dict(collections.Counter(ckpt.info(k)[0] for k in ckpt.keys()).most_common())


def parameter_count(lm: LoadedModel) -> int:
    """Logical parameters (unpacked), from the model's layers: every architecture's own
    set of norms and projections counts without a formula per architecture."""
    from quantrt.models.layers import QuantLinear, RMSNorm, VocabEmbedding

    total = 0
    for module in lm.model.modules():
        if isinstance(module, QuantLinear):
            if module is lm.model.lm_head and lm.config.tie_word_embeddings:
                continue
            total += module.input_size * module.output_size
            total += module.output_size if module.bias is not None else 0
        elif isinstance(module, VocabEmbedding):
            total += module.num_embeddings * module.embedding_dim
        elif isinstance(module, RMSNorm):
            total += module.weight.numel()
    return total


def _rope_text(c: dict[str, Any]) -> str:
    kind = c["rope_scaling"]
    if kind == "default":
        return kind
    text = f"{kind} x{c['rope_factor']:g}"
    if kind in ("llama3", "yarn", "longrope", "dynamic"):
        text += f", original context {c['rope_original_context']}"
    return text


def _attention_lines(c: dict[str, Any]) -> list[str]:
    """Architecture-specific attention settings, one line (none for a plain model)."""
    parts = []
    if c.get("sliding_window"):
        parts.append(f"sliding window {c['sliding_window']} on {c['sliding_layers']} of "
                     f"{c['layers']} layers")
    if c.get("rope_local_theta") is not None:
        parts.append(f"local rope theta {c['rope_local_theta']:g}")
    caps = [f"{name} {c[key]:g}" for name, key in (("attention", "attn_softcap"),
                                                   ("logits", "final_softcap")) if c.get(key)]
    if caps:
        parts.append("softcap " + ", ".join(caps))
    if c.get("attention_scale") is not None and abs(
            c["attention_scale"] - c["head_dim"] ** -0.5) > 1e-9:
        parts.append(f"query scale 1/sqrt({c['attention_scale'] ** -2:g})")
    if c.get("activation", "silu") != "silu":
        parts.append(f"activation {c['activation']}")
    return [f"              {', '.join(parts)}"] if parts else []


def build_report(lm: LoadedModel) -> dict[str, Any]:
    model = lm.model
    layers: dict[str, dict[str, Any]] = {}
    all_tensors: list[torch.Tensor] = []
    for module in model.modules():
        method = getattr(module, "method", None)
        if method is None:
            if hasattr(module, "tracker"):
                all_tensors += layer_tensors(module)
            continue
        tensors = layer_tensors(module)
        all_tensors += tensors
        kind = _layer_kind(module.prefix)
        entry = layers.setdefault(kind, {"count": 0, "weight_format": set(), "kernel": set(),
                                         "bytes": 0})
        entry["count"] += 1
        entry["weight_format"].add(method.describe(module))
        kernel = method.kernel(module).describe() if hasattr(method, "kernel") else "embedding lookup"
        entry["kernel"].add(kernel)
        entry["bytes"] += _unique_bytes(tensors)
    for entry in layers.values():
        entry["weight_format"] = " | ".join(sorted(entry["weight_format"]))
        entry["kernel"] = " | ".join(sorted(entry["kernel"]))
    return {
        "source": str(lm.source.path),
        "format": lm.source.kind,
        "file_bytes": lm.file_bytes,
        "config": lm.config.summary(),
        "parameters": parameter_count(lm),
        "quantization": {"method": lm.quant_config.name, **lm.quant_config.settings()},
        "tensor_types": tensor_type_counts(lm),
        "device": str(lm.device),
        "compute_dtype": str(lm.dtype).removeprefix("torch."),
        "loaded_weight_bytes": _unique_bytes(all_tensors),
        "layers": layers,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_report(r: dict[str, Any]) -> str:
    c = r["config"]
    q = r["quantization"]
    lines = [
        f"source        {r['source']} ({r['format']}, {_mib(r['file_bytes'])})",
        (f"architecture  {c['architecture']}: {c['layers']} layers, hidden {c['hidden_size']}, "
        f"ffn {c['intermediate_size']}, heads {c['heads']}/{c['kv_heads']} (q/kv), "
        f"head_dim {c['head_dim']}, vocab {c['vocab_size']}"),
        (f"              context {c['context_length']}, rope theta {c['rope_theta']:g} "
        f"({_rope_text(c)}), tied embeddings {'yes' if c['tie_word_embeddings'] else 'no'}"),
        *_attention_lines(c),
        f"parameters    {r['parameters'] / 1e6:,.1f} M",
        "quantization  " + q["method"] + "".join(
            f", {k}={v}" for k, v in q.items() if k not in ("method", "tensor_types")),
        "tensor types  " + ", ".join(f"{k} x{v}" for k, v in r["tensor_types"].items()),
        (f"loaded        {_mib(r['loaded_weight_bytes'])} of weights on {r['device']} "
        f"(compute dtype {r['compute_dtype']})"),
        "layers:",
    ]
    width = max(len(k) for k in r["layers"]) if r["layers"] else 0
    for kind, e in r["layers"].items():
        lines.append(f"  {kind:<{width}}  x{e['count']:<3} {e['weight_format']:<10} "
                     f"{_mib(e['bytes']):>11}  {e['kernel']}")
    return "\n".join(lines)
