"""``quantrt estimate``: which quantization of a model fits on which GPUs, with how much KV
cache, computed from its config alone (never its weights).

    from quantrt.estimate import estimate
    est = estimate("meta-llama/Meta-Llama-3-70B", ["awq", "gptq-4bit", "q4_k_m"],
                   gpu="A10G", num_gpus=4, max_model_len=8192)
    print(est.table())

Weight bytes are exact per method (:mod:`quantrt.estimate.layouts`); KV cache, activations
and overheads follow :mod:`quantrt.estimate.memory`.  :func:`compare` sets an estimate
against memory measured on a real GPU (:mod:`quantrt.estimate.validate` measures it).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from quantrt.errors import ConfigError, QuantrtError
from quantrt.estimate.arch import Arch, arch_from_hf
from quantrt.estimate.gpus import CATALOG, GPU, lookup_gpu, resolve_gpu
from quantrt.estimate.layouts import Layout
from quantrt.estimate.memory import (KV_CACHE_DTYPES, Overheads, Settings, WeightBytes,
                                     activation_peak, check_parallel, fit,
                                     kv_bytes_per_sequence, kv_bytes_per_token, weight_bytes_of)
from quantrt.estimate.methods import (ALL, CHECKPOINT, DEFAULT_PRESETS, PRESETS, Method, choose,
                                      layout_from_settings, parse_method, split_specs)

__all__ = ["estimate", "weight_bytes", "compare", "Estimate", "MethodEstimate", "Settings",
           "Overheads", "GPU", "CATALOG", "PRESETS", "DEFAULT_PRESETS", "KV_CACHE_DTYPES",
           "lookup_gpu", "parse_method", "ALL", "CHECKPOINT"]


@dataclass(frozen=True)
class MethodEstimate:
    """One row: a method's weights, what is left for KV cache and whether it fits."""

    name: str
    label: str
    family: str
    checkpoint_bytes: int         # on disk, whole model
    loaded_bytes: int             # in GPU memory, whole model (one GPU)
    weights_per_gpu: int
    activation_bytes: int         # peak of one forward pass, per GPU
    overhead_bytes: int           # CUDA context, graphs, NCCL, per GPU
    kv_budget_bytes: int | None   # None without a GPU
    kv_capacity_tokens: int | None
    max_seqs: int | None          # concurrent sequences of max_model_len (<= max_num_seqs)
    fits: bool | None
    reason: str = ""


@dataclass(frozen=True)
class Estimate:
    source: str
    arch: Arch
    parameters: int
    gpu: GPU | None
    settings: Settings
    max_model_len: int
    kv_bytes_per_token: int       # per GPU
    kv_bytes_per_sequence: int    # one max_model_len sequence, per GPU
    rows: tuple[MethodEstimate, ...]

    def row(self, name: str) -> MethodEstimate:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        from quantrt.estimate.report import to_dict

        return to_dict(self)

    def table(self) -> str:
        from quantrt.estimate.report import format_table

        return format_table(self)


def _methods(methods: Any) -> list[str]:
    if methods is None:
        return []
    if isinstance(methods, (str, Method, Layout)):
        methods = [methods]
    specs: list[Any] = []
    for m in methods:
        specs += split_specs(m) if isinstance(m, str) else [m]
    return specs


def _rows(specs: list[Any], checkpoint: Method, quantized: bool) -> list[Method]:
    """Methods in the order asked for (each name once); none asked: :func:`choose`'s default."""
    if not specs:
        return choose([], checkpoint, quantized)
    out: list[Method] = []
    for s in specs:
        if isinstance(s, Method):
            out.append(s)
        elif isinstance(s, Layout):
            out.append(Method(s.label, s))
        else:
            out += choose([s], checkpoint, quantized)
    seen: set[str] = set()
    return [m for m in out if not (m.name in seen or seen.add(m.name))]


def estimate(source: str | os.PathLike, methods: Any = None, *, gpu: str | GPU | None = None,
             gpu_memory_gib: float | None = None, num_gpus: int = 1,
             max_model_len: int | None = None, max_num_seqs: int = 256,
             max_num_batched_tokens: int = 2048, kv_cache_dtype: str = "auto",
             gpu_memory_utilization: float = 0.90, cuda_graphs: bool = True,
             compute_dtype: str = "bfloat16", overheads: Overheads | None = None) -> Estimate:
    """Estimate memory for ``source`` stored with each of ``methods``.

    ``methods``: None (the checkpoint's own method if it is quantized, else
    :data:`DEFAULT_PRESETS`), ``"all"``, or names/specs (``"awq"``, ``"gptq:bits=3"``,
    ``"checkpoint"``) or :class:`Layout` objects.  ``gpu`` names a catalog GPU;
    ``gpu_memory_gib`` describes one by its memory; with neither, only the weights and KV
    cost per token are reported.
    """
    from quantrt.estimate.source import read_source

    settings = Settings(num_gpus=num_gpus, max_model_len=max_model_len,
                        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        kv_cache_dtype=kv_cache_dtype,
                        gpu_memory_utilization=gpu_memory_utilization, cuda_graphs=cuda_graphs,
                        compute_dtype=compute_dtype, overheads=overheads or Overheads())
    device = resolve_gpu(gpu, gpu_memory_gib)
    specs = _methods(methods)
    src = read_source(source)
    where = src.where
    try:
        return _estimate(src, specs, device, settings)
    except QuantrtError as exc:
        if exc.where is not None:
            raise
        raise type(exc)(exc.message, where=where, hint=exc.hint) from None


def _estimate(src, specs, device, settings: Settings) -> Estimate:
    arch, tp = src.arch, settings.num_gpus
    check_parallel(arch, tp)
    length = settings.max_model_len or arch.max_position
    if length > arch.max_position:
        raise ConfigError(f"max_model_len {length} exceeds the model's context of "
                          f"{arch.max_position} tokens", hint="pass a smaller --max-model-len")
    rows_wanted = _rows(specs, Method(CHECKPOINT, src.layout, True), src.quantized)
    per_token = kv_bytes_per_token(arch, tp, settings.kv_bytes)
    per_seq = kv_bytes_per_sequence(arch, tp, settings.kv_bytes, length)
    overhead = settings.overheads.total(tp, settings.cuda_graphs)
    act_bytes = {"float32": 4}.get(settings.compute_dtype, 2)
    rows = []
    for m in rows_wanted:
        extra = src.extra_bytes if m.from_checkpoint else 0
        wb = weight_bytes_of(arch, m.layout, tp, settings.compute_dtype, extra)
        acts = activation_peak(arch, tp, m.layout, settings.max_num_batched_tokens,
                               settings.max_num_seqs, act_bytes)
        rows.append(_row(m, wb, acts, overhead, device, settings, per_token, per_seq))
    return Estimate(src.name, arch, arch.parameters(), device, settings, length, per_token,
                    per_seq, tuple(rows))


def _row(m: Method, wb: WeightBytes, acts: int, overhead: int, device: GPU | None,
         settings: Settings, per_token: int, per_seq: int) -> MethodEstimate:
    label = m.layout.label + (" (checkpoint)" if m.from_checkpoint else "")
    common = dict(name=m.name, label=label, family=m.layout.family,
                  checkpoint_bytes=wb.checkpoint, loaded_bytes=wb.loaded,
                  weights_per_gpu=wb.per_gpu, activation_bytes=acts, overhead_bytes=overhead)
    if device is None:
        return MethodEstimate(**common, kv_budget_bytes=None, kv_capacity_tokens=None,
                              max_seqs=None, fits=None, reason="")
    blocker = ""
    cc, need = device.capability, m.layout.min_capability
    if cc is not None and cc < need:
        blocker = (f"{m.layout.family} kernels need compute capability {need / 10:.1f}, "
                   f"{device.name} has {cc / 10:.1f}")
    f = fit(device, settings, wb.per_gpu, acts, overhead, per_token, per_seq, blocker)
    return MethodEstimate(**common, kv_budget_bytes=f.kv_budget, kv_capacity_tokens=f.kv_tokens,
                          max_seqs=f.max_seqs, fits=f.fits, reason=f.reason)


def weight_bytes(config: dict[str, Any], quantization: str | Layout | dict[str, Any] | None = None,
                 *, num_gpus: int = 1, compute_dtype: str = "bfloat16",
                 where: str = "config.json") -> WeightBytes:
    """Exact weight bytes of the model a ``config.json`` dict describes, stored with
    ``quantization``: None (the config's own quantization_config, or unquantized), a
    method name/spec, a :class:`Layout`, or a quantization_config dict."""
    from quantrt.quant.detect import _method_of

    arch = arch_from_hf(config, where)
    check_parallel(arch, num_gpus)
    if isinstance(quantization, Layout):
        layout = quantization
    elif isinstance(quantization, str):
        layout = parse_method(quantization).layout
    else:
        qc = quantization if quantization is not None else config.get("quantization_config")
        if isinstance(qc, dict):
            layout = layout_from_settings(_method_of(qc, where), qc, where)
        else:
            layout = layout_from_settings("none", {}, where)
    return weight_bytes_of(arch, layout, num_gpus, compute_dtype)


def compare(row: MethodEstimate | Estimate,
            measured: dict[str, float]) -> dict[str, dict[str, float]]:
    """Estimated vs measured bytes, per quantity present in ``measured``: weights_per_gpu,
    loaded_bytes, activation_bytes, overhead_bytes, kv_bytes_per_token, kv_capacity_tokens.
    Each entry: {"estimated", "measured", "relative_error"} (estimated / measured - 1)."""
    if isinstance(row, Estimate):
        if len(row.rows) != 1:
            raise ConfigError("compare needs an estimate with one method, or one of its rows")
        fields = {**asdict(row.rows[0]), "kv_bytes_per_token": row.kv_bytes_per_token}
    else:
        fields = asdict(row)
    out = {}
    for key, value in measured.items():
        if key not in fields or not isinstance(fields[key], (int, float)):
            raise ConfigError(f"cannot compare {key!r}", hint="known: weights_per_gpu, "
                              "loaded_bytes, activation_bytes, overhead_bytes, "
                              "kv_bytes_per_token, kv_capacity_tokens")
        est = fields[key]
        out[key] = {"estimated": est, "measured": value,
                    "relative_error": est / value - 1 if value else float("inf")}
    return out
