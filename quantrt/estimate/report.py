"""An :class:`~quantrt.estimate.Estimate` as a table for people or a dict for JSON."""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantrt.estimate import Estimate

GIB = 1 << 30


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB"


def to_dict(est: "Estimate") -> dict[str, Any]:
    a, s = est.arch, est.settings
    return {
        "source": est.source,
        "model": {
            "architecture": a.name, "layers": a.layers, "hidden_size": a.hidden,
            "intermediate_size": a.intermediate, "heads": a.heads, "kv_heads": a.kv_heads,
            "head_dim": a.head_dim, "vocab_size": a.vocab, "experts": a.experts,
            "experts_per_token": a.experts_per_token, "tied_embeddings": a.tied,
            "context_length": a.max_position, "sliding_window_layers":
                sum(1 for i in range(a.layers) if a.window(i) is not None),
            "checkpoint_dtype": a.dtype, "parameters": est.parameters,
        },
        "gpu": None if est.gpu is None else {
            "name": est.gpu.name, "memory_bytes": est.gpu.memory_bytes,
            "compute_capability": (None if est.gpu.compute_capability is None
                                   else ".".join(map(str, est.gpu.compute_capability)))},
        "settings": {**{k: v for k, v in asdict(s).items() if k != "overheads"},
                     "overheads": asdict(s.overheads), "max_model_len": est.max_model_len},
        "kv_bytes_per_token_per_gpu": est.kv_bytes_per_token,
        "kv_bytes_per_sequence_per_gpu": est.kv_bytes_per_sequence,
        "methods": [asdict(r) for r in est.rows],
    }


def format_table(est: "Estimate") -> str:
    a, s = est.arch, est.settings
    moe = f", {a.experts} experts (top {a.experts_per_token})" if a.experts else ""
    lines = [
        f"model     {est.source}: {a.name}, {a.layers} layers, hidden {a.hidden}, "
        f"heads {a.heads}/{a.kv_heads} (q/kv){moe}, vocab {a.vocab}, "
        f"{est.parameters / 1e9:.2f} B parameters",
    ]
    if est.gpu is not None:
        usable = int(est.gpu.memory_bytes * s.gpu_memory_utilization)
        lines.append(f"gpus      {s.num_gpus} x {est.gpu.name} ({_gib(est.gpu.memory_bytes)}); "
                     f"{s.gpu_memory_utilization:.0%} usable = {_gib(usable)} per GPU")
    kv = s.kv_cache_dtype if s.kv_cache_dtype != "auto" else s.compute_dtype
    lines.append(f"context   {est.max_model_len} tokens, up to {s.max_num_seqs} sequences; "
                 f"KV cache {kv}: {_kib(est.kv_bytes_per_token)} per token per GPU, "
                 f"{_gib(est.kv_bytes_per_sequence)} per full sequence")
    if est.rows:
        r0 = est.rows[0]
        lines.append(f"overhead  {_gib(r0.overhead_bytes)} per GPU (CUDA context"
                     f"{', graphs' if s.cuda_graphs else ''}{', NCCL' if s.num_gpus > 1 else ''}); "
                     f"activations of a {s.max_num_batched_tokens}-token batch per method")
    lines.append("")
    header = ("method", "checkpoint", "weights/GPU", "activations", "KV tokens",
              f"seqs@{est.max_model_len}", "fits")
    table = [header]
    for r in est.rows:
        if r.fits is None:
            verdict = "-"
        else:
            verdict = "yes" if r.fits else f"no: {r.reason}"
        table.append((r.name, _gib(r.checkpoint_bytes), _gib(r.weights_per_gpu),
                      _gib(r.activation_bytes),
                      "-" if r.kv_capacity_tokens is None else f"{r.kv_capacity_tokens:,}",
                      "-" if r.max_seqs is None else str(r.max_seqs), verdict))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        numbers = zip(row[1:-1], widths[1:], strict=True)
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in numbers]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    lines.append("")
    lines.append("checkpoint: size on disk (whole model); weights/GPU: held in GPU memory after "
                 "loading, as quantrt lays it out")
    lines += [f"{r.name}: {r.label}" for r in est.rows if r.name != r.label]
    if est.gpu is None:
        lines.append("give --gpu NAME or --gpu-memory GIB to see what fits")
    return "\n".join(lines)
