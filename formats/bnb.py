"""bitsandbytes checkpoints as transformers saves them (``QuantState.as_dict(packed=True)``).

4-bit (NF4 / FP4), for a weight of logical shape ``[N, K]`` flattened row-major (n values):

* ``weight`` uint8 ``[ceil(n/2), 1]``: value ``2i`` in the HIGH nibble, ``2i+1`` in the low
  one; an odd n pads the last low nibble with the code index of 0.0 (7 for NF4, 0 for
  FP4), because bitsandbytes pads the scaled input with 0 before rounding.  A
  ``bnb_4bit_quant_storage`` other than uint8 stores the same bytes viewed as that dtype.
* ``weight.absmax`` fp32 ``[ceil(n/blocksize)]`` (blocks run across rows; a partial last
  block has its own absmax), or with double quant uint8 codes into
  ``weight.nested_quant_map`` (fp32 [256], bitsandbytes' signed "dynamic" map) scaled per
  ``nested_blocksize`` (256) block by ``weight.nested_absmax`` fp32, plus ``nested_offset``
  (the mean subtracted before the nested quantization).
* ``weight.quant_map`` fp32 [16] (the code); ``weight.quant_state.bitsandbytes__nf4`` (or
  ``__fp4``) uint8 bytes of a JSON object {quant_type, blocksize, dtype, shape,
  [nested_blocksize, nested_dtype, nested_offset]}.

W.flat[i] = quant_map[idx[i]] * absmax[i // blocksize], in float32, then cast to ``dtype``.

LLM.int8: ``weight`` int8 ``[N, K]``, ``SCB`` fp32 ``[N]`` row absmax, ``weight_format``
uint8 0 (row-major).  w = q * SCB / 127, computed as bitsandbytes'
``int8_vectorwise_dequant`` does: ``q * SCB * float32(1/127)``.
"""
from __future__ import annotations

import json

import torch

from quantrt.errors import FormatError

# bitsandbytes functional.get_4bit_type("nf4"): quantiles of N(0, 1) (QLoRA,
# arXiv:2305.14314), bnb's create_normal_map(offset=0.9677083), stored as float32.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)
# bitsandbytes get_4bit_type("fp4"): sign + 2 exponent + 1 mantissa bits with bias 2,
# listed in bit-pattern order and divided by the largest magnitude (12) in float32.
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                        dtype=torch.float32) / 12.0
_INV127 = 7.874015718698502e-3  # the literal bitsandbytes multiplies by


def get_code(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return NF4_CODE.clone()
    if quant_type == "fp4":
        return FP4_CODE.clone()
    raise FormatError(f"bitsandbytes: unknown 4-bit quant_type {quant_type!r} (nf4 or fp4)")


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (create_dynamic_map(True, 7, 8)).

    Exponent i = 0..6 owns 2**i fraction steps: the midpoints of linspace(0.1, 1, 2**i + 1)
    scaled by 10**(i - 6), both signs; plus 0 and 1.0; sorted.  Used for double-quant
    absmax; the checkpoint stores it as ``nested_quant_map``.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        parts += [(10 ** (i - 6)) * mids, -(10 ** (i - 6)) * mids]
    return torch.sort(torch.cat(parts).to(torch.float32)).values


# ---------------------------------------------------------------- nibble layout
def unpack_4bit(weight: torch.Tensor, numel: int) -> torch.Tensor:
    """Packed bytes (any shape / storage dtype) -> uint8 code indices ``[numel]``."""
    raw = weight.contiguous().reshape(-1)
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    if raw.numel() != -(-numel // 2):
        raise FormatError(f"bitsandbytes weight: {raw.numel()} bytes but {numel} 4-bit values "
                          f"need {-(-numel // 2)}")
    return torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1)[:numel]


def pack_4bit(idx: torch.Tensor, pad_index: int = 0,
              storage: torch.dtype = torch.uint8) -> torch.Tensor:
    """Code indices ``[n]`` -> ``[ceil(n/2), 1]`` bytes, low index in the high nibble."""
    flat = idx.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_tensor([pad_index])])
    packed = ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)
    if storage != torch.uint8:
        packed = packed.reshape(-1).view(storage).reshape(-1, 1)
    return packed


# ---------------------------------------------------------------- quant_state JSON
def parse_quant_state(blob: torch.Tensor) -> dict:
    """``weight.quant_state.bitsandbytes__*`` uint8 tensor -> dict (validated)."""
    try:
        meta = json.loads(bytes(blob.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"bitsandbytes quant_state: not a JSON byte tensor ({exc})") from None
    if not isinstance(meta, dict):
        raise FormatError("bitsandbytes quant_state: JSON is not an object")
    for key in ("quant_type", "blocksize", "dtype", "shape"):
        if key not in meta:
            raise FormatError(f"bitsandbytes quant_state: missing {key!r} (has {sorted(meta)})")
    if meta["quant_type"] not in ("nf4", "fp4"):
        raise FormatError(f"bitsandbytes quant_state: quant_type {meta['quant_type']!r}")
    return meta


def build_quant_state(meta: dict) -> torch.Tensor:
    """dict -> uint8 JSON tensor, key order and json.dumps spacing as bitsandbytes writes."""
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def quant_state_key(quant_type: str) -> str:
    return f"quant_state.bitsandbytes__{quant_type}"


# ---------------------------------------------------------------- 8-bit blockwise (absmax)
def _scale_blocks(flat: torch.Tensor, blocksize: int):
    """Per-block absmax and values scaled into [-1, 1], rounded like bitsandbytes'
    torch backend: full blocks multiply by the reciprocal, the tail block divides."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = [torch.clamp(body * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)]
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled.append(torch.clamp(flat[full:] / tail_max, -1, 1))
    return torch.cat(scaled), absmax


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value; a tie goes to the smaller value."""
    srt, order = torch.sort(code.to(torch.float32))
    return order[torch.bucketize(x, (srt[:-1] + srt[1:]) / 2)]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """8-bit code-book quantization -> (uint8 idx, fp32 absmax per block).

    Round-to-nearest, identical to bitsandbytes' torch backend; its native CPU library
    uses an approximate SIMD binary search that picks the upper neighbour for ~0.1% of
    values, so nested absmax codes can differ from a bitsandbytes-written file by one
    step (reading such files is unaffected: the stored codes are used as they are).
    """
    scaled, absmax = _scale_blocks(x.reshape(-1).to(torch.float32), blocksize)
    return _nearest(scaled, code).to(torch.uint8), absmax


def dequantize_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor | None = None,
                      nested_quant_map: torch.Tensor | None = None, nested_offset=None,
                      nested_blocksize: int = 256) -> torch.Tensor:
    """fp32 absmax, or double-quant uint8 codes -> fp32 absmax."""
    if absmax.dtype != torch.uint8:
        return absmax.reshape(-1).to(torch.float32)
    if nested_absmax is None or nested_quant_map is None or nested_offset is None:
        raise FormatError("bitsandbytes absmax: uint8 (double quant) needs nested_absmax, "
                          "nested_quant_map and nested_offset")
    n = absmax.numel()
    if nested_absmax.numel() != -(-n // nested_blocksize):
        raise FormatError(f"bitsandbytes nested_absmax: {nested_absmax.numel()} entries but "
                          f"{n} absmax codes in blocks of {nested_blocksize} need "
                          f"{-(-n // nested_blocksize)}")
    if nested_quant_map.numel() != 256:
        raise FormatError(f"bitsandbytes nested_quant_map: {nested_quant_map.numel()} entries, "
                          "expected 256")
    blk = torch.arange(n, device=absmax.device) // nested_blocksize
    vals = nested_quant_map.to(torch.float32)[absmax.reshape(-1).long()]
    return vals * nested_absmax.reshape(-1).to(torch.float32)[blk] + float(nested_offset)


# ---------------------------------------------------------------- 4-bit
def dequantize_4bit(weight: torch.Tensor, absmax: torch.Tensor, quant_state, *,
                    quant_map: torch.Tensor | None = None,
                    nested_absmax: torch.Tensor | None = None,
                    nested_quant_map: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """One 4-bit layer -> W of the stored ``shape`` (``[N, K]``) in ``dtype``
    (default: the quant_state's ``dtype``).  ``quant_state`` is the JSON tensor or its dict;
    ``quant_map`` defaults to the standard code of its quant_type."""
    from quant_kernels.int_ref import dequant_lut

    meta = quant_state if isinstance(quant_state, dict) else parse_quant_state(quant_state)
    shape = tuple(int(s) for s in meta["shape"])
    n = 1
    for s in shape:
        n *= s
    bs = int(meta["blocksize"])
    if bs <= 0:
        raise FormatError(f"bitsandbytes quant_state: blocksize {bs}")
    code = quant_map if quant_map is not None else get_code(meta["quant_type"])
    if code.numel() != 16:
        raise FormatError(f"bitsandbytes quant_map: {code.numel()} entries, expected 16")
    am = dequantize_absmax(absmax, nested_absmax, nested_quant_map, meta.get("nested_offset"),
                           int(meta.get("nested_blocksize", 256)))
    idx = unpack_4bit(weight, n)
    out_dtype = dtype or getattr(torch, str(meta["dtype"]), None)
    if not isinstance(out_dtype, torch.dtype):
        raise FormatError(f"bitsandbytes quant_state: unknown dtype {meta['dtype']!r}")
    return dequant_lut(idx, code, am, bs, shape, out_dtype)


def dequantize_4bit_state_dict(tensors: dict, prefix: str = "weight",
                               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize from the serialized keys ``{prefix}``, ``{prefix}.absmax``, ..."""
    qs = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(qs) != 1:
        raise FormatError(f"bitsandbytes: expected one {prefix}.quant_state.bitsandbytes__* "
                          f"tensor, found {qs}")
    for need in (prefix, f"{prefix}.absmax"):
        if need not in tensors:
            raise FormatError(f"bitsandbytes: missing tensor {need!r}")
    return dequantize_4bit(tensors[prefix], tensors[f"{prefix}.absmax"], tensors[qs[0]],
                           quant_map=tensors.get(f"{prefix}.quant_map"),
                           nested_absmax=tensors.get(f"{prefix}.nested_absmax"),
                           nested_quant_map=tensors.get(f"{prefix}.nested_quant_map"),
                           dtype=dtype)


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False, nested_blocksize: int = 256,
                  storage: torch.dtype = torch.uint8, prefix: str = "weight") -> dict:
    """W -> the transformers-serialized tensors (same keys and rounding as bitsandbytes'
    CPU ``quantize_4bit``: scale by 1/absmax, clamp to [-1, 1], nearest code with ties
    to the lower code, FP4 mapped back to its bit-pattern order)."""
    code = get_code(quant_type)
    scaled, absmax = _scale_blocks(w.reshape(-1).to(torch.float32), blocksize)
    idx = _nearest(scaled, code)
    zero_idx = int(_nearest(torch.zeros(1), code))
    # The None slots hold bitsandbytes' as_dict() key order, so the JSON bytes match.
    meta = {"quant_type": quant_type, "absmax": None, "blocksize": blocksize,
            "quant_map": None, "dtype": str(w.dtype).replace("torch.", ""),
            "shape": list(w.shape)}
    out = {prefix: pack_4bit(idx, zero_idx, storage)}
    if double_quant:
        offset = absmax.mean()
        qabs, nested = quantize_blockwise(absmax - offset, dynamic_map(), nested_blocksize)
        out[f"{prefix}.absmax"] = qabs
        out[f"{prefix}.nested_absmax"] = nested
        out[f"{prefix}.nested_quant_map"] = dynamic_map()
        meta.update(nested_blocksize=nested_blocksize, nested_dtype="float32",
                    nested_offset=offset.item())
    else:
        out[f"{prefix}.absmax"] = absmax
    out[f"{prefix}.quant_map"] = code
    meta = {k: v for k, v in meta.items() if v is not None}
    out[f"{prefix}.{quant_state_key(quant_type)}"] = build_quant_state(meta)
    return out


# ---------------------------------------------------------------- LLM.int8
def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if weight.dtype != torch.int8 or weight.ndim != 2:
        raise FormatError(f"bitsandbytes int8 weight: expected 2-D int8, got {weight.dtype} "
                          f"shape {tuple(weight.shape)}")
    if scb.numel() != weight.shape[0]:
        raise FormatError(f"bitsandbytes SCB: {scb.numel()} row scales for weight "
                          f"{tuple(weight.shape)} (one per output row expected)")
    return (weight * scb.reshape(-1, 1).to(torch.float32) * _INV127).to(dtype)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 (bitsandbytes ``int8_vectorwise_quant`` without outliers)."""
    w = w.reshape(-1, w.shape[-1])
    scb = w.abs().amax(dim=1).to(torch.float32)
    return torch.round(w * (127.0 / scb[:, None])).to(torch.int8), scb
