"""HQQ layers (hqq 0.2.x ``HQQLinear`` state dicts and ``Quantizer``).

A weight of ``shape`` [N, K] with group size g is viewed, before quantization, as

* axis=1: ``W.reshape(-1, g)`` -> [N*K/g, g]: each row is one group of g consecutive
  values in row-major order; ``scale``/``zero`` are [N*K/g, 1];
* axis=0: ``W.reshape(g, -1)`` -> [g, N*K/g]: column c groups the flat indices
  c, c + M, c + 2M, ... (M = N*K/g); ``scale``/``zero`` are [1, N*K/g];
* group_size None: the [N, K] matrix itself, one group per row (axis=1) or column (axis=0).

W_q (unsigned, [R, C] in that view) is packed along dim 0 by splitting the R rows into P
equal slabs: slab j goes to bit offset (P-1-j)*b of the container, so slab 0 lands in
the most significant bits (hqq ``BitPack``):

  ========  ====  ==  ========================================
  packing   bits  P   container / rows
  ========  ====  ==  ========================================
  8bit_u8   8     1   uint8 [R, C] (also used for 5, 6 bits)
  4bit_u8   4     2   uint8 [R/2, C]
  2bit_u8   2     4   uint8 [R/4, C] (also used for 1.58 bits)
  1bit_u8   1     8   uint8 [R/8, C]
  3bit_32   3     10  int32 [ceil(R/10), C], R zero-padded to a multiple of 10
  ========  ====  ==  ========================================

The u8 packings need R divisible by P (hqq silently mis-packs otherwise); 3bit_32 pads.
``view_as_float`` checkpoints store the packed bytes viewed as a float dtype.

W = ((W_q - zero) * scale).reshape(shape); zero and scale are floats (zero is not
rounded unless ``round_zero``), so both operations round: hqq computes them in its
``compute_dtype`` (fp16 by default), which is what :func:`dequantize` does by default
(the dtype of ``scale``).
"""
from __future__ import annotations

import torch

from quantrt.errors import FormatError

# packing -> (bits per value, values per container, container dtype)
PACKINGS = {
    "8bit_u8": (8, 1, torch.uint8),
    "4bit_u8": (4, 2, torch.uint8),
    "2bit_u8": (2, 4, torch.uint8),
    "1bit_u8": (1, 8, torch.uint8),
    "3bit_32": (3, 10, torch.int32),
}
# Same mapping as hqq's Quantizer.bit_to_packing.
BIT_TO_PACKING = {8: "8bit_u8", 6: "8bit_u8", 5: "8bit_u8", 4: "4bit_u8", 3: "3bit_32",
                  2: "2bit_u8", 1.58: "2bit_u8", 1: "1bit_u8"}


def _spec(packing: str):
    if packing not in PACKINGS:
        raise FormatError(f"HQQ: unknown packing {packing!r} (expected one of {sorted(PACKINGS)})")
    return PACKINGS[packing]


def view_shape(shape, group_size: int | None, axis: int) -> tuple[int, int]:
    """(R, C) of the unpacked W_q for a weight of ``shape``."""
    if axis not in (0, 1):
        raise FormatError(f"HQQ: axis must be 0 or 1, got {axis}")
    numel = 1
    for s in shape:
        numel *= int(s)
    if group_size is None:
        if len(shape) != 2:
            raise FormatError(f"HQQ: group_size None needs a 2-D shape, got {tuple(shape)}")
        return int(shape[0]), int(shape[1])
    if group_size <= 0 or numel % group_size:
        raise FormatError(f"HQQ: group_size {group_size} does not divide the {numel} values "
                          f"of shape {tuple(shape)}")
    return (numel // group_size, group_size) if axis == 1 else (group_size, numel // group_size)


def pack(w_q: torch.Tensor, packing: str) -> torch.Tensor:
    """Unsigned ``[R, C]`` codes -> packed container tensor (hqq ``BitPack.pack_*``)."""
    bits, per, container = _spec(packing)
    if w_q.ndim != 2:
        raise FormatError(f"HQQ pack: W_q must be 2-D [R, C], got {tuple(w_q.shape)}")
    v = w_q.to(torch.int32)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise FormatError(f"HQQ pack: codes must lie in [0, {1 << bits}) for {packing}")
    r = v.shape[0]
    if container == torch.int32:
        v = torch.nn.functional.pad(v, (0, 0, 0, (-r) % per))
    elif r % per:
        raise FormatError(f"HQQ pack: {packing} needs the {r} rows of W_q to be a multiple "
                          f"of {per}")
    slabs = v.reshape(per, -1, v.shape[1])  # slab j = rows [j*step, (j+1)*step)
    shifts = torch.arange(per - 1, -1, -1, dtype=torch.int32, device=v.device) * bits
    return (slabs << shifts[:, None, None]).sum(dim=0, dtype=torch.int32).to(container)


def unpack(packed: torch.Tensor, packing: str, rows: int | None = None) -> torch.Tensor:
    """Packed container -> int32 ``[rows, C]`` codes; ``rows`` drops 3bit_32's padding."""
    bits, per, container = _spec(packing)
    if packed.ndim != 2:
        raise FormatError(f"HQQ W_q: expected 2-D packed tensor, got {tuple(packed.shape)}")
    if packed.dtype.is_floating_point:  # view_as_float checkpoints
        packed = packed.contiguous().view(container)
    if packed.dtype != container:
        raise FormatError(f"HQQ W_q: {packing} stores {container}, got {packed.dtype}")
    p = packed.to(torch.int32)
    shifts = torch.arange(per - 1, -1, -1, dtype=torch.int32, device=p.device) * bits
    out = ((p[None] >> shifts[:, None, None]) & ((1 << bits) - 1)).reshape(-1, p.shape[1])
    if rows is not None:
        if not (out.shape[0] - per < rows <= out.shape[0]):
            raise FormatError(f"HQQ W_q: {packed.shape[0]} packed rows of {packing} hold "
                              f"{out.shape[0]} rows, not {rows}")
        out = out[:rows]
    return out


def dequantize(w_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape,
               group_size: int | None, axis: int, packing: str | None = None,
               nbits: float | None = None, *, compute_dtype: torch.dtype | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """W of ``shape`` = ((W_q - zero) * scale), both ops in ``compute_dtype``
    (default: scale's dtype).  ``packing`` None means W_q is already unpacked."""
    shape = tuple(int(s) for s in shape)
    r, c = view_shape(shape, group_size, axis)
    if packing is None and nbits is not None:
        packing = BIT_TO_PACKING.get(nbits)
    codes = unpack(w_q, packing, rows=r) if packing else w_q
    if tuple(codes.shape) != (r, c):
        raise FormatError(f"HQQ W_q: unpacks to {tuple(codes.shape)} but shape {shape} with "
                          f"group_size={group_size}, axis={axis} needs {(r, c)}")
    want = (r, 1) if axis == 1 else (1, c)
    for name, t in (("scale", scale), ("zero", zero)):
        if t.numel() != want[0] * want[1]:
            raise FormatError(f"HQQ {name}: shape {tuple(t.shape)} but expected {want}")
    cd = compute_dtype or scale.dtype
    w = (codes.to(cd) - zero.reshape(want).to(cd)) * scale.reshape(want).to(cd)
    return w.reshape(shape).to(dtype or cd)


def quantize(w: torch.Tensor, nbits: int = 4, group_size: int | None = 64, axis: int = 1,
             round_zero: bool = False, bitpack: bool = True):
    """Min/max quantization as hqq's ``Quantizer.quantize(optimize=False)``.

    -> ``(W_q, scale, zero)`` with scale/zero float32 in the view shape ((R,1) or (1,C))
    and W_q packed (or unpacked int32 [R, C] with ``bitpack=False``).  hqq's proximal
    ``optimize=True`` refinement is not reproduced: it only changes the numbers, never
    the layout.
    """
    shape = tuple(w.shape)
    r, c = view_shape(shape, group_size, axis)
    x = w.to(torch.float32).reshape(r, c)
    lo = x.amin(dim=axis, keepdim=True)
    hi = x.amax(dim=axis, keepdim=True)
    max_v = round(2 ** nbits - 1)
    denom = hi - lo
    # hqq works with the inverse scale, guards tiny ranges, then inverts it on output.
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), max_v / denom)
    inv = inv.clamp(max=2e4)
    zero = -lo * inv
    if round_zero:
        zero = torch.round(zero)
    q = (x * inv + zero).round_().clamp_(0, max_v).to(torch.int32)
    packed = pack(q, BIT_TO_PACKING[nbits]) if bitpack else q
    return packed, 1.0 / inv, zero


def _decode(value, kind):
    if not isinstance(value, torch.Tensor):
        return value
    if kind is str:
        return "".join(chr(int(i)) for i in value.reshape(-1))
    if kind is bool:
        return bool(value.item())
    if kind is tuple:
        return tuple(int(i) for i in value.reshape(-1))
    v = value.item()
    return int(v) if kind is int and float(v).is_integer() else v


def parse_layer(state: dict) -> dict:
    """An HQQLinear state dict (encoded for safetensors or raw) -> plain metadata:
    W_q, scale, zero, bias, shape, nbits, group_size, axis, packing, view_as_float."""
    for key in ("W_q", "scale", "zero", "shape", "nbits", "axis"):
        if key not in state:
            raise FormatError(f"HQQ layer: missing {key!r} (has {sorted(state)})")
    nbits = _decode(state["nbits"], float)
    nbits = int(nbits) if float(nbits).is_integer() else nbits
    gs = state.get("group_size")
    meta = {
        "W_q": state["W_q"], "scale": state["scale"], "zero": state["zero"],
        "bias": state.get("bias"),
        "shape": _decode(state["shape"], tuple),
        "nbits": nbits,
        "group_size": None if gs is None else _decode(gs, int),
        "axis": _decode(state["axis"], int),
        "packing": _decode(state.get("packing"), str) or BIT_TO_PACKING.get(nbits),
        "view_as_float": bool(_decode(state.get("view_as_float", False), bool)),
    }
    if meta["packing"] not in PACKINGS:
        raise FormatError(f"HQQ layer: packing {meta['packing']!r} is not one of "
                          f"{sorted(PACKINGS)}")
    return meta


def dequantize_layer(state: dict, *, compute_dtype: torch.dtype | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    m = parse_layer(state)
    return dequantize(m["W_q"], m["scale"], m["zero"], m["shape"], m["group_size"], m["axis"],
                      m["packing"], compute_dtype=compute_dtype, dtype=dtype)
