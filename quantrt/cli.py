"""The ``quantrt`` command line."""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import click

from quantrt.errors import ConfigError, QuantrtError
from quantrt.estimate.memory import KV_CACHE_DTYPES  # light: no torch
from quantrt.loader import DTYPES, KERNEL_POLICIES

if TYPE_CHECKING:
    from quantrt.parallel.executor import TPExecutor

# torch.Generator.manual_seed takes a 64-bit seed; larger ones overflow deep in the sampler.
MAX_SEED = 2**63 - 1


class _Group(click.Group):
    """Turns QuantrtError into one line on stderr and exit status 2 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantrtError as exc:
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@contextmanager
def _about(source: str) -> Iterator[None]:
    """Name the model in errors raised without a file (prompt too long, no chat template)."""
    try:
        yield
    except QuantrtError as exc:
        if exc.where is not None:
            raise
        raise type(exc)(exc.message, where=source, hint=exc.hint) from None


def _common(f):
    f = click.option("--quantization", "-q", default=None,
                     help="Quantization method; must agree with the checkpoint.")(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")(f)
    f = click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto",
                     help="Compute dtype (default: float32 on CPU, checkpoint's on GPU).")(f)
    f = click.option("--kernels", type=click.Choice(KERNEL_POLICIES), default="auto",
                     help="'reference' forces the exact torch reference path.")(f)
    return f


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantrt")
def main() -> None:
    """quantrt: load a quantized LLM checkpoint and run it fast."""


@main.command()
@click.argument("source")
@_common
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(source: str, quantization, device, dtype, kernels, as_json: bool) -> None:
    """Describe a model: architecture, quantization, memory and kernel per layer type.

    SOURCE is a .gguf file, a model directory, a hub id, or 'demo'.  The model is loaded
    (GGUF weights are memory-mapped) so that memory and kernels are the real ones.
    """
    from quantrt.loader import load

    lm = load(source, quantization, device=device, dtype=dtype, kernels=kernels)
    from quantrt.inspect_report import build_report, format_report  # after load: torch is slow

    with _about(source):
        report = build_report(lm)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@contextmanager
def _shut_down(executor: "TPExecutor | None") -> Iterator[None]:
    """Stop the tensor-parallel workers (if any) however the block ends."""
    try:
        yield
    finally:
        if executor is not None:
            executor.shutdown()


def _kv_cache_dtype(f):
    # one option for run, serve and estimate: the names are the estimator's (KV_CACHE_DTYPES)
    return click.option("--kv-cache-dtype", type=click.Choice(list(KV_CACHE_DTYPES)),
                        default="auto", show_default=True,
                        help="KV cache element type: auto = the model's dtype; fp8 (= "
                             "fp8_e4m3) or fp8_e5m2 hold twice the tokens.")(f)


@main.command()
@click.argument("source", required=False, default="demo")
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", "-t", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--top-k", type=click.IntRange(min=-1), default=40, show_default=True,
              help="0 or -1 disables.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
              help="Seed for reproducible sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--stats", is_flag=True, help="Print token counts and speed to stderr.")
@click.option("--tensor-parallel-size", "-tp", type=click.IntRange(min=1), default=1,
              show_default=True, help="Split the model over this many GPUs (processes).")
@_kv_cache_dtype
@_common
def run(source: str, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int,
        seed, chat: bool, system, stats: bool, tensor_parallel_size: int, kv_cache_dtype: str,
        quantization, device, dtype, kernels) -> None:
    """Generate text from SOURCE (default: the demo model), streamed to stdout."""
    from quantrt.parallel.launch import load_model

    # click's FloatRange lets nan and inf through; the sampler would crash on them.
    if not math.isfinite(temperature):
        raise ConfigError(f"--temperature must be a finite number, got {temperature}", where=source)
    if not math.isfinite(top_p):
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}", where=source)
    if system is not None and not chat:
        raise ConfigError("--system only applies with --chat", where=source,
                          hint="add --chat, or put the instructions in the prompt")
    t0 = time.perf_counter()
    lm, executor = load_model(source, quantization, tensor_parallel_size, device=device,
                              dtype=dtype, kernels=kernels)
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine  # after load: torch is slow
    from quantrt.engine.sequence import SamplingParams

    with _about(source), _shut_down(executor):
        tok = lm.tokenizer
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        else:
            ids = tok.encode(prompt)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
        engine = LLMEngine(lm, EngineConfig(tensor_parallel_size=tensor_parallel_size,
                                            kv_cache_dtype=kv_cache_dtype), executor)
        t1 = time.perf_counter()
        seq = engine.add_request(ids, params)
        first = None
        emitted = 0
        while not seq.finished:
            for out in engine.step():
                if out.seq is not seq:
                    continue
                if first is None:
                    first = time.perf_counter()
                emitted += len(out.new_text)
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
        sys.stdout.write(seq.output_text[emitted:] + "\n")
    t2 = time.perf_counter()
    if stats:
        n = len(seq.output_ids)
        decode = t2 - (first or t2)
        rate = f"{(n - 1) / decode:.1f} tokens/s" if n > 1 and decode > 0 else "n/a"
        click.echo(f"[load {t1 - t0:.2f}s; prompt {len(ids)} tokens, first token after "
                   f"{(first or t2) - t1:.3f}s; {n} tokens generated, decode {rate}; "
                   f"finish: {seq.finish_reason.value}]", err=True)


@main.command("estimate")
@click.argument("source")
@click.option("--quantization", "-q", "methods", multiple=True,
              help="Method(s) to compare: presets (bf16 fp8 int8 awq gptq-4bit gptq-3bit nf4 "
                   "q4_k_m ...), NAME:key=value,..., 'checkpoint' or 'all'; repeat the option "
                   "or separate with commas.  Default: the checkpoint's own method if it is "
                   "quantized, else common presets.")
@click.option("--gpu", default=None, help="GPU name: A10G, L4, T4, A100-40GB, A100-80GB, "
                                          "H100-80GB, H200, RTX-4090 ...")
@click.option("--gpu-memory", type=float, default=None,
              help="Memory per GPU in GiB (instead of --gpu).")
@click.option("--num-gpus", type=int, default=1, show_default=True, help="Tensor-parallel GPUs.")
@click.option("--max-model-len", type=int, default=None,
              help="Context length per sequence (default: the model's).")
@click.option("--max-num-seqs", type=int, default=256, show_default=True)
@click.option("--max-num-batched-tokens", type=int, default=2048, show_default=True)
@_kv_cache_dtype
@click.option("--gpu-memory-utilization", type=float, default=0.90, show_default=True)
@click.option("--enforce-eager", is_flag=True,
              help="No CUDA graphs (their memory is not reserved).")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate_command(source: str, methods: tuple[str, ...], gpu, gpu_memory, num_gpus: int,
                     max_model_len, max_num_seqs: int, max_num_batched_tokens: int,
                     kv_cache_dtype: str, gpu_memory_utilization: float, enforce_eager: bool,
                     as_json: bool) -> None:
    """Which quantization of SOURCE fits on the GPUs, and how much KV cache is left.

    SOURCE is a model directory, a config.json, a .gguf file (header only) or a hub id
    (config.json only): no weights are read or downloaded.
    """
    from quantrt.estimate import estimate

    est = estimate(source, list(methods) or None, gpu=gpu, gpu_memory_gib=gpu_memory,
                   num_gpus=num_gpus, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, kv_cache_dtype=kv_cache_dtype,
                   gpu_memory_utilization=gpu_memory_utilization, cuda_graphs=not enforce_eager)
    click.echo(json.dumps(est.to_dict(), indent=2) if as_json else est.table())


@main.command("serve")
@click.argument("source")
@_common
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="0 picks a free port (printed at startup).")
@click.option("--api-key", envvar="QUANTRT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 (or set QUANTRT_API_KEY).")
@click.option("--served-model-name", default=None,
              help="Model name in the API (default: SOURCE as given).")
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="Context length per sequence (default: the model's).")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=64, show_default=True,
              help="Sequences in the running batch.")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True),
              default=None, help="Fraction of GPU memory this server may use (default 0.9); "
                                 "the KV cache gets what the weights and the profiled "
                                 "activations leave.")
@click.option("--kv-cache-memory", default=None,
              help="KV-cache size, bytes or e.g. 4GiB (default: 1 GiB on CPU; on a GPU, what "
                   "--gpu-memory-utilization leaves).")
@_kv_cache_dtype
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="Seconds in-flight requests get after SIGTERM before "
                                      "they are aborted.")
@click.option("--uvicorn-log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug", "trace"]))
@click.option("--tensor-parallel-size", "-tp", type=click.IntRange(min=1), default=1,
              show_default=True, help="Split the model over this many GPUs (processes).")
def serve_command(source: str, quantization, device, dtype, kernels, host: str, port: int,
                  api_key, served_model_name, max_model_len, max_num_seqs: int,
                  gpu_memory_utilization, kv_cache_memory, kv_cache_dtype: str,
                  shutdown_timeout: float, uvicorn_log_level: str,
                  tensor_parallel_size: int) -> None:
    """Serve SOURCE over an OpenAI-compatible HTTP API (/v1/completions,
    /v1/chat/completions, /v1/models, /health, /metrics)."""
    if not math.isfinite(shutdown_timeout):
        raise ConfigError(f"--shutdown-timeout must be finite, got {shutdown_timeout}")
    try:
        from quantrt.server.launch import build_engine, serve
    except ImportError as exc:
        raise ConfigError(f"the server needs the 'serve' extra ({exc.name} is missing)",
                          hint="pip install 'quantrt[serve]'") from None

    engine = build_engine(source, quantization, device, dtype, kernels,
                          max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          kv_cache_memory=kv_cache_memory,
                          gpu_memory_utilization=gpu_memory_utilization,
                          kv_cache_dtype=kv_cache_dtype,
                          tensor_parallel_size=tensor_parallel_size)
    try:
        serve(engine, served_model_name or source, host=host, port=port, api_key=api_key,
              shutdown_timeout=shutdown_timeout, log_level=uvicorn_log_level)
    finally:
        engine.engine.shutdown()   # the tensor-parallel workers, if any


from quantrt.convert.cli_commands import register as _register_convert  # noqa: E402

_register_convert(main)  # quantrt convert, quantrt eval ppl


if __name__ == "__main__":  # pragma: no cover
    main()
