"""Lossless transcodes: integer weights written as stored, never re-quantized.

A source that holds grouped integer weights -- GGUF Q4_0 / Q8_0 tensors, GPTQ, AWQ and
compressed-tensors int checkpoints -- hands an integer writer (``--algo rtn``) an
:class:`IntWeight` of its own codes, scales and zeros:

* Q4_0 block: ``w = d * (q - 8)``, fp16 d -> 4-bit, group 32, zero 8 (symmetric);
* Q8_0 block: ``w = d * q``, int8 q, fp16 d -> 8-bit, group 32, zero 128 (symmetric);
* GPTQ / AWQ / compressed-tensors: their unpacked codes (quantrt.quant's ``to_int``).

What the target cannot hold exactly is refused: bits, group size, symmetry and act-order
before any work (:func:`check_transcode`), and scale values that the target's scale dtype
would round when their tensor is reached (the output is then never put in place).
"""
from __future__ import annotations

import torch

from quantrt.convert.intq import IntWeight
from quantrt.convert.request import INT_KINDS, ConvertRequest
from quantrt.errors import UnsupportedError

# GGML types whose blocks are an integer grid: (bits, zero point).
GGUF_INT_TYPES = {2: (4, 8), 8: (8, 128)}  # GGMLQuantizationType Q4_0 = 2, Q8_0 = 8
GROUP = 32


def gguf_int_weight(raw: torch.Tensor, ggml_type: int, rows: int, cols: int) -> IntWeight:
    """Q4_0 / Q8_0 bytes [rows, row_bytes] (rows already in HF order) -> IntWeight."""
    from quant_kernels.gguf_ref_base import f16, nibbles

    bits, zero = GGUF_INT_TYPES[ggml_type]
    block_bytes = 2 + GROUP * bits // 8
    blocks = raw.reshape(-1, block_bytes)
    d = f16(blocks, 0).reshape(rows, cols // GROUP)
    if bits == 4:
        q = nibbles(blocks[:, 2:]).to(torch.int32)
    else:
        q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.int32) + zero
    q = q.reshape(rows, cols)
    return IntWeight(q.t().contiguous(), d.t().contiguous(),
                     torch.full((cols // GROUP, rows), zero, dtype=torch.int32), None, bits,
                     GROUP)


def from_packed(iw, cols: int) -> IntWeight | None:
    """quantrt.quant's IntWeight (group_size = K for one group, int or float zeros) ->
    the converter's (-1 for one group), or None when it is not an integer grid (HQQ)."""
    if iw.zeros.dtype.is_floating_point and not torch.equal(iw.zeros, iw.zeros.round()):
        return None
    zeros = iw.zeros.to(torch.int32)
    g_idx = iw.g_idx
    gs = iw.group_size if iw.group_size < cols else -1
    if g_idx is not None:
        plain = torch.arange(cols) // (cols if gs == -1 else gs)
        g_idx = None if torch.equal(g_idx.long().cpu(), plain) else g_idx.to(torch.int32)
    return IntWeight(iw.q.to(torch.int32), iw.scales.float(), zeros, g_idx, iw.bits, gs)


def _group(g: int, cols: int) -> int:
    return cols if g <= 0 or g >= cols else g


def describe(iw: IntWeight) -> str:
    sym = bool((iw.zeros == 1 << (iw.bits - 1)).all())
    g = "per-channel" if iw.group_size <= 0 else f"group {iw.group_size}"
    return (f"{iw.bits}-bit {g} {'symmetric' if sym else 'asymmetric'}"
            + (" act-order" if iw.g_idx is not None else ""))


def fit(iw: IntWeight, req: ConvertRequest, name: str, scale_dtype: torch.dtype) -> IntWeight:
    """``iw`` as the request's target holds it, or UnsupportedError saying what differs."""
    cols = iw.q.shape[0]
    flags = f"--bits {iw.bits} --group-size {iw.group_size}"
    sym = bool((iw.zeros == 1 << (iw.bits - 1)).all())
    why = None
    if iw.bits != req.bits:
        why = f"{req.bits}-bit"
    elif _group(iw.group_size, cols) != _group(req.group_size, cols):
        why = f"--group-size {req.group_size}"
    elif req.sym and not sym:
        why = "--sym (the source has zero points)"
    elif iw.g_idx is not None and req.kind == "awq":
        why = "AWQ (no g_idx for the source's act-order)"
    if why is not None:
        match = ("write --to gptq or ct-w4a16, which keep g_idx" if why.startswith("AWQ")
                 else f"pass {flags}{' --asym' if not sym else ''}")
        raise UnsupportedError(
            f"{name}: the source holds {describe(iw)} integer weights, and a lossless "
            f"transcode cannot write them as {why}",
            hint=f"{match}, or re-quantize from a dequantized copy (--to fp16 first)")
    scales = iw.scales.to(scale_dtype).float()
    if not torch.equal(scales, iw.scales):
        bad = (scales != iw.scales).sum().item()
        raise UnsupportedError(f"{name}: {bad} scales are not exactly representable in "
                               f"{str(scale_dtype).removeprefix('torch.')}, the target's "
                               f"scale dtype", hint="use --dtype float16 (or float32) for "
                               "compressed-tensors, or convert to --to fp16 instead")
    return IntWeight(iw.q, scales, iw.zeros, iw.g_idx, iw.bits, req.group_size)


def transcodes(req: ConvertRequest) -> bool:
    """Whether integer sources go to this target as stored (no algorithm asked for)."""
    return req.kind in INT_KINDS and req.algo == "rtn"


def scale_dtype_of(req: ConvertRequest) -> torch.dtype:
    """The dtype the target stores scales in (compressed-tensors: the model's)."""
    return getattr(torch, req.dtype) if req.kind == "ct-int" else torch.float16


def check_transcode(req: ConvertRequest, src) -> None:
    """Pick the transcode for an integer source when no algorithm was asked for, and
    refuse a settings mismatch before any work (checked on the first linear)."""
    from quantrt.convert.source import is_linear_weight

    first = next((n for n in src.names if is_linear_weight(n, src.shape(n))), None)
    iw = None if first is None else src.source_int_weight(first)
    if iw is None:
        return
    if req.kind in INT_KINDS and not req.algo_given:
        req.algo = "rtn"  # --to gptq / awq default to their algorithms, not here
    if transcodes(req):
        fit(iw, req, first, scale_dtype_of(req))
