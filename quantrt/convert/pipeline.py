"""The conversion driver: source -> (algorithm) -> writer, one tensor or layer at a time."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator

from quantrt.convert.output import atomic_output
from quantrt.convert.request import ConvertRequest
from quantrt.convert.source import ConvertSource, is_linear_weight, open_source
from quantrt.convert.writer_base import Writer
from quantrt.errors import QuantrtError, UnsupportedError


def writer_class(kind: str) -> type[Writer]:
    from quantrt.convert import writer_hqq, writers_float, writers_int

    classes = {"gptq": writers_int.GPTQWriter, "awq": writers_int.AWQWriter,
               "ct-int": writers_int.CTIntWriter, "ct-fp8": writers_float.CTFp8Writer,
               "fp8": writers_float.Fp8Writer, "bnb": writers_float.BnbWriter,
               "float": writers_float.FloatWriter, "hqq": writer_hqq.HQQWriter}
    if kind == "gguf":
        from quantrt.convert.writer_gguf import GGUFWriter

        return GGUFWriter
    return classes[kind]


def progress_bar(items: Iterable, total: int, desc: str, show: bool) -> Iterator:
    if not show:
        return iter(items)
    from tqdm import tqdm

    return iter(tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False))


def check_shapes(req: ConvertRequest, src: ConvertSource) -> None:
    """Refuse, before writing anything, a linear layer the target format cannot hold."""
    for name in src.names:
        shape = src.shape(name)
        if not is_linear_weight(name, shape):
            continue
        n, k = shape
        g = req.group_size
        if req.kind == "awq" and n % 8:
            raise UnsupportedError(f"{name}: AWQ GEMM needs out_features % 8 == 0, got {n}",
                                   where=src.path)
        if req.kind == "ct-int" and g > 0 and k > g and k % g:
            raise UnsupportedError(f"{name}: compressed-tensors needs in_features ({k}) to "
                                   f"be a multiple of --group-size {g}", where=src.path,
                                   hint="choose a group size that divides every K")
        if req.method == "ct-fp8-block" and k % req.fp8_block[1]:
            raise UnsupportedError(f"{name}: FP8_BLOCK quantizes activations in groups of "
                                   f"{req.fp8_block[1]}, and K={k} is not a multiple",
                                   where=src.path, hint="use --to ct-fp8 (per channel)")
        if req.kind == "hqq" and g > 0 and (n * k) % g:
            raise UnsupportedError(f"{name}: HQQ groups of {g} do not tile [{n}, {k}]",
                                   where=src.path)
        if req.kind == "gguf" and req.gguf_type not in ("F32", "F16", "BF16") and k % 32:
            raise UnsupportedError(f"{name}: {req.gguf_type} blocks hold 32 values and "
                                   f"K={k} is not a multiple of 32", where=src.path)


def run(source, out: str, req: ConvertRequest, show: bool) -> str:
    src = open_source(source)
    try:
        from quantrt.convert.transcode import check_transcode

        check_transcode(req, src)
        check_shapes(req, src)
        if req.calibrated:
            from quantrt.convert.calibrated import check_calibration

            check_calibration(req, src)
        with atomic_output(out, is_file=req.kind == "gguf") as tmp:
            writer = writer_class(req.kind)(req, src, tmp)
            if req.calibrated:
                from quantrt.convert.calibrated import run_calibrated

                run_calibrated(req, src, writer, show)
            else:
                for name in progress_bar(src.names, len(src.names), f"convert -> {req.method}",
                                         show):
                    emit(src, writer, name)
            writer.finish()
    except QuantrtError as exc:
        if exc.where is None:
            raise type(exc)(exc.message, where=src.path, hint=exc.hint) from None
        raise
    finally:
        src.close()
    return out


def emit(src: ConvertSource, writer: Writer, name: str) -> None:
    """Pass one source tensor to the writer (lossless integer transcode where possible)."""
    shape = src.shape(name)
    if is_linear_weight(name, shape):
        iw = getattr(src, "int_weight", lambda *a: None)(name, writer)
        writer.add_linear(name, iw.dequantize() if iw is not None else src.get(name), iw)
    else:
        writer.add_tensor(name, src.get(name))
