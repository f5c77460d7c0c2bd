"""``quantrt convert`` and ``quantrt eval ppl`` (registered on the main group by cli.py).
Kept apart from cli.py so that importing the CLI stays light: torch is imported only
once a command runs."""
from __future__ import annotations

import click

from quantrt.convert.request import ALGOS, FP8_SCHEMES, METHODS


def register(main: click.Group) -> None:
    main.add_command(convert_command)
    main.add_command(eval_group)


@click.command("convert")
@click.argument("source")
@click.argument("out")
@click.option("--to", "method", required=True, type=click.Choice(list(METHODS)),
              help="Target format.")
@click.option("--bits", type=int, default=None, help="Weight bits (gptq 2/3/4/8, hqq 1-8).")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="-1: one group per row.")
@click.option("--sym/--asym", default=None, help="Symmetric (no zero point) or asymmetric.")
@click.option("--act-order", is_flag=True, help="GPTQ: quantize columns by descending "
                                                "Hessian diagonal (writes g_idx).")
@click.option("--algo", type=click.Choice(ALGOS), default=None,
              help="rtn, gptq or awq (default: gptq for --to gptq, awq for --to awq).")
@click.option("--calib", default=None, help="Calibration text file (default: built-in text).")
@click.option("--calib-samples", type=int, default=32, show_default=True)
@click.option("--calib-seqlen", type=int, default=512, show_default=True)
@click.option("--damp", type=float, default=0.01, show_default=True,
              help="GPTQ dampening (fraction of the mean Hessian diagonal).")
@click.option("--no-true-sequential", is_flag=True, help="GPTQ: one pass per layer.")
@click.option("--awq-scales/--no-awq-scales", default=None,
              help="AWQ: also search per-channel scales, as published (off by default: on "
                   "the demo model scales + clip recovered 28% of asymmetric RTN's 4-bit "
                   "perplexity increase, clip search alone 58%; BENCHMARKS.md, \"Convert: "
                   "quality\").")
@click.option("--awq-clip-qk/--no-awq-clip-qk", default=None,
              help="AWQ: clip q_proj/k_proj too (on by default; AutoAWQ leaves them "
                   "unclipped).  --awq-scales --no-awq-clip-qk is the published recipe.")
@click.option("--fp8-scheme", type=click.Choice(FP8_SCHEMES), default="tensor",
              show_default=True, help="--to fp8: tensor, channel or block (128x128) scales.")
@click.option("--gguf-type", default="Q4_0", show_default=True,
              help="--to gguf: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 F16 BF16 F32.")
@click.option("--double-quant", is_flag=True, help="--to bnb-nf4: quantize the absmax too.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              default="float16", show_default=True,
              help="dtype of unquantized tensors and scales (bf16 for --to bf16).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert_command(source: str, out: str, method: str, bits, group_size: int, sym,
                    act_order: bool, algo, calib, calib_samples: int, calib_seqlen: int,
                    damp: float, no_true_sequential: bool, awq_scales: bool | None,
                    awq_clip_qk: bool | None, fp8_scheme: str, gguf_type: str,
                    double_quant: bool, dtype: str, quiet: bool) -> None:
    """Quantize or transcode SOURCE (HF directory, .gguf, 'demo') into OUT.

    An integer source (GGUF Q4_0/Q8_0, GPTQ, AWQ, compressed-tensors int) written to
    --to gptq/awq/ct-w4a16/ct-w8a16 without --algo keeps its codes and scales as they
    are (lossless; --bits/--group-size/--sym must match it).  Any quantized source is
    dequantized for the other targets.  OUT must not exist; it appears only when the
    conversion is complete."""
    import signal
    import sys
    import time

    from quantrt.convert import ConvertRequest, convert

    # SIGTERM's default action skips Python's cleanup; as an exception it unwinds through
    # the temp-directory removal like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    req = ConvertRequest(method, bits=bits, group_size=group_size, sym=sym,
                         act_order=act_order, algo=algo, calib=calib,
                         calib_samples=calib_samples, calib_seqlen=calib_seqlen, damp=damp,
                         true_sequential=not no_true_sequential, awq_scales=awq_scales,
                         awq_clip_qk=awq_clip_qk, fp8_scheme=fp8_scheme,
                         gguf_type=gguf_type, double_quant=double_quant, dtype=dtype)
    t0 = time.perf_counter()
    path = convert(source, out, req, progress=None if not quiet else False)
    click.echo(f"wrote {path} ({req.method}, {req.algo}) in {time.perf_counter() - t0:.1f}s",
               err=True)


@click.group("eval")
def eval_group() -> None:
    """Evaluate a model."""


@eval_group.command("ppl")
@click.argument("source")
@click.option("--text", "text_file", required=True, help="UTF-8 text file to score.")
@click.option("--ctx", type=click.IntRange(min=2), default=512, show_default=True,
              help="Window length in tokens (non-overlapping windows).")
@click.option("--max-windows", type=click.IntRange(min=1), default=None,
              help="Score at most this many windows.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def ppl_command(source: str, text_file: str, ctx: int, max_windows, device: str, dtype: str,
                as_json: bool) -> None:
    """Perplexity of SOURCE on the text of --text."""
    import json

    from quantrt.eval import perplexity

    res = perplexity(source, text_file, ctx=ctx, max_windows=max_windows, device=device,
                     dtype=dtype)
    if as_json:
        click.echo(json.dumps(res.as_dict()))
    else:
        click.echo(f"perplexity {res.ppl:.4f} over {res.tokens} tokens "
                   f"({res.windows} windows of {res.ctx})")
