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
    cfg = lm.config
    attn = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
    if cfg.attention_bias:
        attn += cfg.q_size + 2 * cfg.kv_size
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    norms = 2 * cfg.hidden_size + (2 * cfg.head_dim if cfg.qk_norm else 0)
    embed = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else embed
    return embed + head + cfg.hidden_size + cfg.num_layers * (attn + mlp + norms)


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
        f"architecture  {c['architecture']}: {c['layers']} layers, hidden {c['hidden_size']}, "
        f"ffn {c['intermediate_size']}, heads {c['heads']}/{c['kv_heads']} (q/kv), "
        f"head_dim {c['head_dim']}, vocab {c['vocab_size']}",
        f"              context {c['context_length']}, rope theta {c['rope_theta']:g} "
        f"({c['rope_scaling']}), tied embeddings {'yes' if c['tie_word_embeddings'] else 'no'}",
        f"parameters    {r['parameters'] / 1e6:,.1f} M",
        "quantization  " + q["method"] + "".join(
            f", {k}={v}" for k, v in q.items() if k not in ("method", "tensor_types")),
        "tensor types  " + ", ".join(f"{k} x{v}" for k, v in r["tensor_types"].items()),
        f"loaded        {_mib(r['loaded_weight_bytes'])} of weights on {r['device']} "
        f"(compute dtype {r['compute_dtype']})",
        "layers:",
    ]
    width = max(len(k) for k in r["layers"]) if r["layers"] else 0
    for kind, e in r["layers"].items():
        lines.append(f"  {kind:<{width}}  x{e['count']:<3} {e['weight_format']:<10} "
                     f"{_mib(e['bytes']):>11}  {e['kernel']}")
    return "\n".join(lines)
