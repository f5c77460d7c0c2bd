"""The two-level quantization interface (after vLLM).

* A :class:`QuantConfig` is built from a checkpoint's quantization settings
  (``QuantConfig.from_config(dict)``) and answers ``get_quant_method(layer, prefix)``.
* A :class:`LinearMethod` / :class:`EmbeddingMethod` owns one layer's weights:
  ``create_weights`` -> ``load_weight`` (per checkpoint tensor, per fused shard) ->
  ``process_weights_after_loading`` (repack for the chosen kernel) -> ``apply``.

Layers never branch on the format: unquantized weights are just another method.
Subclasses register themselves by name (and aliases) through ``__init_subclass__``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from quantrt.errors import ConfigError, UnsupportedError

if TYPE_CHECKING:  # torch is only needed by implementations; the CLI's error paths skip it
    import torch

_CONFIGS: dict[str, type["QuantConfig"]] = {}


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel a layer runs, and why each faster kernel was refused."""

    name: str
    refused: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        if not self.refused:
            return self.name
        why = "; ".join(f"{k}: {r}" for k, r in self.refused)
        return f"{self.name} (refused: {why})"


class QuantConfig(ABC):
    """Quantization settings of a checkpoint; one subclass per method."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            for key in (cls.name, *cls.aliases):
                _CONFIGS[normalize_method_name(key)] = cls

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantConfig":
        """Build from the checkpoint's quantization dict (with the key aliases real files use)."""

    @abstractmethod
    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> "LinearMethod | EmbeddingMethod":
        """The method that owns ``layer`` (named ``prefix`` in HF naming)."""

    def settings(self) -> dict[str, Any]:
        """The settings ``inspect`` shows."""
        return {}


def normalize_method_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def canonical_method(name: str, where: str | None = None) -> str:
    """The normalised name of a method quantrt knows (implemented or only recognised);
    aliases map to their method.  Unknown names raise ConfigError."""
    from quantrt.quant import catalog  # noqa: F401  (registers every method)

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"quantization method must be a non-empty string, got {name!r}",
                          where=where)
    key = normalize_method_name(name)
    if key in _CONFIGS:
        return normalize_method_name(_CONFIGS[key].name)
    if key in catalog.NOT_SUPPORTED:
        return key
    raise ConfigError(f"unknown quantization method {name!r}", where=where,
                      hint=f"implemented: {', '.join(known_methods())}; "
                           f"{len(catalog.NOT_SUPPORTED)} more are recognised but not "
                           f"supported yet")


def config_class(name: str, where: str | None = None) -> type[QuantConfig]:
    """Look up a registered method by name or alias; unknown names get a clear error."""
    from quantrt.quant import catalog  # noqa: F401  (registers every method)

    key = canonical_method(name, where)
    if key in _CONFIGS:
        return _CONFIGS[key]
    raise UnsupportedError(f"quantization method {name!r} is recognised but not supported yet: "
                           f"{catalog.NOT_SUPPORTED[key]}", where=where)


def known_methods() -> list[str]:
    from quantrt.quant import catalog  # noqa: F401

    return sorted({cls.name for cls in _CONFIGS.values()})


class LinearMethod(ABC):
    """Owns the weights of one linear layer (possibly several fused output shards)."""

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        """Register the layer's parameters with the on-disk names, shapes and dtypes."""

    @abstractmethod
    def load_weight(self, layer: torch.nn.Module, name: str, tensor: Any, shard: int) -> None:
        """Copy one checkpoint tensor (``name`` is the part after the layer prefix) into
        output shard ``shard`` of the layer."""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module, device: torch.device) -> None:
        """Check completeness, move to ``device`` and repack for the chosen kernel."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x @ W^T (+ bias)."""

    def kernel(self, layer: torch.nn.Module) -> KernelChoice:
        return getattr(layer, "kernel_choice", KernelChoice("torch-reference"))

    # -- tensor parallelism: called after loading, before process_weights_after_loading --
    def tp_units(self, layer: torch.nn.Module) -> tuple[int, int]:
        """(output rows, input columns): the granularity at which the stored weights can be
        cut.  A unit as large as the dimension means "cannot be cut there" (the layer is
        then kept whole on every rank and fed zero-padded inputs)."""
        return 1, 1

    def shard(self, layer: torch.nn.Module, rows: list[list[tuple[int, int]]] | None,
              cols: tuple[int, int] | None) -> None:
        """Keep only output rows ``rows`` (per fused shard, ranges in that shard) or input
        columns ``cols`` of the loaded weights; the cuts respect :meth:`tp_units`."""
        raise UnsupportedError(f"{type(self).__name__} layers cannot be split for tensor "
                               "parallelism yet", where=getattr(layer, "prefix", None))

    def weight_bytes(self, layer: torch.nn.Module) -> int:
        """Bytes the layer's weights occupy after loading (shared tensors counted once by caller)."""
        return sum(t.numel() * t.element_size() for t in layer_tensors(layer))

    def describe(self, layer: torch.nn.Module) -> str:
        """Short weight-format label for ``inspect``."""
        return type(self).__name__


class EmbeddingMethod(ABC):
    """Owns a token embedding table; ``embed`` looks rows up without dequantizing the rest."""

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype) -> None: ...

    @abstractmethod
    def load_weight(self, layer: torch.nn.Module, name: str, tensor: Any) -> None: ...

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module, device: torch.device) -> None: ...

    @abstractmethod
    def embed(self, layer: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...

    def shard_rows(self, layer: torch.nn.Module, start: int, end: int) -> None:
        """Keep only vocabulary rows [start, end) of the loaded table (tensor parallelism)."""
        raise UnsupportedError(f"{type(self).__name__} tables cannot be split for tensor "
                               "parallelism yet", where=getattr(layer, "prefix", None))

    def weight_bytes(self, layer: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in layer_tensors(layer))

    def describe(self, layer: torch.nn.Module) -> str:
        return type(self).__name__


def layer_tensors(layer: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a layer holds for its weights: parameters, buffers and kernel-side tensors."""
    tensors = [p for p in layer.parameters(recurse=False)] + [b for b in layer.buffers(recurse=False)]
    for extra in getattr(layer, "kernel_tensors", ()):
        tensors.append(extra)
    return [t for t in tensors if t is not None]


@dataclass
class ShardTracker:
    """Remembers which (tensor name, shard) pairs were loaded, to name what is missing."""

    expected: set[tuple[str, int]] = field(default_factory=set)
    loaded: set[tuple[str, int]] = field(default_factory=set)

    def mark(self, name: str, shard: int) -> None:
        self.loaded.add((name, shard))

    def missing(self) -> list[tuple[str, int]]:
        return sorted(self.expected - self.loaded)


def is_quantized(layer: torch.nn.Module, quantized: "Callable[[str], bool]") -> bool:
    """Apply a per-module rule (skip lists, regex overrides) to a layer that may fuse several
    checkpoint modules; they must agree, since one fused layer has one format."""
    names = getattr(layer, "shard_prefixes", None) or [layer.prefix]
    flags = [bool(quantized(n)) for n in names]
    if len(set(flags)) > 1:
        mixed = ", ".join(f"{n} ({'quantized' if f else 'not quantized'})"
                          for n, f in zip(names, flags))
        raise UnsupportedError(f"modules fused into {layer.prefix} disagree: {mixed}",
                               hint="fused q/k/v and gate/up layers must share one format")
    return flags[0]


def config_get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` present in ``config`` (real checkpoints spell settings several
    ways: ``w_bit|bits``, ``q_group_size|group_size``)."""
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    return default


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"quantization setting {key!r} must be true or false, got {value!r}")
    return value


def check_int(value: Any, key: str, allowed: tuple[int, ...] | None = None,
              minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"quantization setting {key!r} must be an integer, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"quantization setting {key!r} = {value} is not supported",
                          hint=f"expected one of {', '.join(map(str, allowed))}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"quantization setting {key!r} = {value} must be at least {minimum}")
    return value


def fast_kernel_refusal(policy: str, device: "torch.device", runs_on: str | None = None
                        ) -> str | None:
    """Why a fast kernel may not run at all (the reference path was asked for, or it runs
    on another device type), or None; each kernel then checks its own limits."""
    if policy == "reference":
        return "reference kernels requested"
    if runs_on is not None and device.type != runs_on:
        where = "CUDA GPUs" if runs_on == "cuda" else "the CPU"
        return f"runs on {where} only (device is {device.type})"
    return None
