"""bitsandbytes (4-bit NF4/FP4, LLM.int8) and HQQ layouts, as transformers serialises them
(formats/bnb.py, formats/hqq.py).  Their skip lists name whole dotted parts of module
names, as transformers matches them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from quantrt.errors import ConfigError
from quantrt.estimate.arch import Weight
from quantrt.estimate.layouts import (DTYPE_BYTES, TRITON_AUTOTUNE_BYTES, Layout, RepackedToWQ,
                                     TensorSpec, cdiv, component_match)

# bitsandbytes writes the double-quant offset (a float32 mean) with Python's repr, so the
# JSON blob's length depends on the data: 17 significant digits make it 18-20 characters,
# 19 for a typical 0.xxx value.  This is the only data-dependent byte count (+-1 B a layer).
NESTED_OFFSET_CHARS = 19


@dataclass(frozen=True)
class BnB4(Layout):
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    storage: str = "uint8"
    skip_modules: tuple[str, ...] = ("lm_head",)
    family: ClassVar[str] = "bitsandbytes"
    dequantizes_weights: ClassVar[bool] = True  # the large-M path expands, then cuBLAS
    # The fused code-book kernel (quant_kernels/triton_lut4) autotunes on first use.
    kernel_workspace: ClassVar[int] = TRITON_AUTOTUNE_BYTES

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"bitsandbytes 4-bit quant_type must be nf4 or fp4, got "
                              f"{self.quant_type!r}")
        if self.storage not in DTYPE_BYTES:
            raise ConfigError(f"unknown bnb_4bit_quant_storage {self.storage!r}")

    @property
    def label(self) -> str:
        return f"bitsandbytes {self.quant_type}" + (" double-quant" if self.double_quant else "")

    def quantizes(self, w: Weight) -> bool:
        return not any(component_match(w.name, key) for key in self.skip_modules)

    def quantized(self, w, n, k, full_k, ctx):
        numel = n * k
        blocks = cdiv(numel, self.blocksize)
        meta: dict[str, Any] = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                                "dtype": ctx.checkpoint, "shape": [n, k]}
        # Two 4-bit codes a byte, viewed as the storage dtype (uint8 unless configured).
        packed = cdiv(cdiv(numel, 2), DTYPE_BYTES[self.storage])
        out = [TensorSpec("weight", (packed, 1), self.storage)]
        if self.double_quant:
            meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=0.0)
            out += [TensorSpec("weight.absmax", (blocks,), "uint8"),
                    TensorSpec("weight.nested_absmax", (cdiv(blocks, 256),), "float32"),
                    TensorSpec("weight.nested_quant_map", (256,), "float32")]
        else:
            out.append(TensorSpec("weight.absmax", (blocks,), "float32"))
        blob = len(json.dumps(meta)) + (NESTED_OFFSET_CHARS - 3 if self.double_quant else 0)
        return out + [TensorSpec("weight.quant_map", (16,), "float32"),
                      TensorSpec(f"weight.quant_state.bitsandbytes__{self.quant_type}",
                                 (blob,), "uint8", kept=False)]


@dataclass(frozen=True)
class BnB8(Layout):
    skip_modules: tuple[str, ...] = ("lm_head",)
    family: ClassVar[str] = "bitsandbytes"

    @property
    def label(self) -> str:
        return "bitsandbytes LLM.int8"

    def quantizes(self, w: Weight) -> bool:
        return not any(component_match(w.name, key) for key in self.skip_modules)

    def quantized(self, w, n, k, full_k, ctx):
        return [TensorSpec("weight", (n, k), "int8"), TensorSpec("SCB", (n,), "float32"),
                TensorSpec("weight_format", (), "uint8", kept=False)]


# HQQ packings: bits -> (values per container along dim 0, container dtype); 8/6/5 bits
# are stored one per byte (hqq's Quantizer.bit_to_packing).
HQQ_PACKING = {8: (1, "uint8"), 6: (1, "uint8"), 5: (1, "uint8"), 4: (2, "uint8"),
               3: (10, "int32"), 2: (4, "uint8"), 1: (8, "uint8")}


@dataclass(frozen=True)
class HQQ(RepackedToWQ):
    nbits: int = 4
    group_size: int | None = 64
    axis: int = 1
    skip_modules: tuple[str, ...] = ("lm_head",)
    compute_dtype: str = "float16"   # scale and zero are stored in it
    family: ClassVar[str] = "hqq"
    min_capability: ClassVar[int] = 80

    def __post_init__(self) -> None:
        if self.nbits not in HQQ_PACKING:
            raise ConfigError(f"HQQ nbits must be one of {sorted(HQQ_PACKING)}, got {self.nbits!r}")
        if self.axis not in (0, 1):
            raise ConfigError(f"HQQ axis must be 0 or 1, got {self.axis!r}")

    @property
    def label(self) -> str:
        return f"HQQ {self.nbits}-bit g{self.group_size} axis {self.axis}"

    def wq_settings(self, w, k):
        # Groups along K (axis 1) are affine per row; a group size not dividing K runs on
        # into the next row, so quantrt splits groups to gcd(K, g) columns (quant/hqq.py).
        # Axis 0 groups run across rows: not WQ.
        if self.axis != 1:
            return None
        return self.nbits, math.gcd(k, self.group_size) if self.group_size else 0, False

    def quantizes(self, w: Weight) -> bool:
        return w.role != "router" and not any(
            component_match(w.name, key) for key in self.skip_modules)

    def quantized(self, w, n, k, full_k, ctx):
        numel = n * k
        if self.group_size:
            g = self.group_size
            count = cdiv(numel, g)
            rows, cols = (count, g) if self.axis == 1 else (g, count)
        else:
            rows, cols, count = n, k, n if self.axis == 1 else k
        per, container = HQQ_PACKING[self.nbits]
        meta = (count, 1) if self.axis == 1 else (1, count)
        return [TensorSpec("W_q", (cdiv(rows, per), cols), container),
                TensorSpec("scale", meta, self.compute_dtype),
                TensorSpec("zero", meta, self.compute_dtype)]
