"""Single-stream greedy generation speed on the CPU: quantrt vs HF transformers, same GGUF,
same machine, same run.  Not a test: prints a markdown table and writes JSON.

    python scripts/bench_cpu.py [--source demo] [--tokens 64] [--repeats 3] [--json out.json]

Each engine generates ``--tokens`` new tokens (EOS ignored) after the same prompt; the
figure is new tokens / wall time of the whole generate call (prompt processing included),
best of ``--repeats``.  HF loads the GGUF dequantized to fp32 (its only way).  Rows: quantrt's
default kernels; the same with the CPU extension off (``QUANTRT_CPU_EXT=0``: torch's tinygemm
int4 kernel and torch ops, the path before the extension; run in a child process, since the
extension's state is per process); ``--kernels reference``; HF transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

PROMPT = "The capital of France is"


def bench_quantrt(source: str, tokens: int, repeats: int, kernels: str) -> dict:
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.engine.sequence import SamplingParams
    from quantrt.loader import load

    t0 = time.perf_counter()
    lm = load(source, device="cpu", kernels=kernels, progress=False)
    load_s = time.perf_counter() - t0
    engine = LLMEngine(lm, EngineConfig(kv_cache_memory=256 << 20))
    ids = lm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    best, text = float("inf"), ""
    for _ in range(repeats + 1):  # first run warms up allocators and caches
        t = time.perf_counter()
        seq = engine.generate([ids], params)[0]
        best = min(best, time.perf_counter() - t)
        text = lm.tokenizer.decode(seq.output_ids)
    down = lm.model.layers[0].mlp.down_proj
    kernel = down.method.kernel(down).name
    return {"tok_s": tokens / best, "load_s": load_s, "text": text,
            "source": str(lm.source.path), "kernel": kernel}


def bench_ext_off(args: argparse.Namespace) -> dict:
    """The default kernels with the CPU extension disabled, in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "child.json")
        cmd = [sys.executable, __file__, "--child", "--source", args.source, "--tokens",
               str(args.tokens), "--repeats", str(args.repeats), "--json", out]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True, env={**os.environ, "QUANTRT_CPU_EXT": "0"})
        with open(out) as f:
            return json.load(f)


def bench_hf(path: str, tokens: int, repeats: int) -> dict:
    import os

    import transformers

    t0 = time.perf_counter()
    d, name = os.path.dirname(path), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name,
                                                              dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = tok(PROMPT, return_tensors="pt").input_ids
    best, text = float("inf"), ""
    for _ in range(repeats + 1):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        best = min(best, time.perf_counter() - t)
        text = tok.decode(out[0, ids.shape[1]:])
    return {"tok_s": tokens / best, "load_s": load_s, "text": text,
            "version": transformers.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="demo")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        with open(args.json, "w") as f:
            json.dump(bench_quantrt(args.source, args.tokens, args.repeats, "auto"), f)
        return
    fast = bench_quantrt(args.source, args.tokens, args.repeats, "auto")
    off = bench_ext_off(args)
    ref = bench_quantrt(args.source, args.tokens, args.repeats, "reference")
    hf = bench_hf(fast["source"], args.tokens, args.repeats)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"cpu capability {torch.backends.cpu.get_cpu_capability()}",
        "torch": torch.__version__, "transformers": hf["version"], "python": sys.version.split()[0],
        "tokens": args.tokens, "quantrt": fast, "quantrt_ext_off": off,
        "quantrt_reference": ref, "hf": hf,
        "ratio_vs_hf": fast["tok_s"] / hf["tok_s"],
    }
    print(f"| engine | tokens/s | vs HF |\n|---|---|---|\n"
          f"| quantrt ({fast['kernel']}) | {fast['tok_s']:.1f} | {fast['tok_s'] / hf['tok_s']:.2f}x |\n"
          f"| quantrt, extension off ({off['kernel']}) | {off['tok_s']:.1f} | "
          f"{off['tok_s'] / hf['tok_s']:.2f}x |\n"
          f"| quantrt (reference kernels) | {ref['tok_s']:.1f} | {ref['tok_s'] / hf['tok_s']:.2f}x |\n"
          f"| HF transformers {hf['version']} (GGUF dequantized, fp32) | {hf['tok_s']:.1f} | 1.00x |")
    print(f"\n{result['machine']}; torch {result['torch']}; {args.tokens} new tokens, best of "
          f"{args.repeats}")
    print(f"quantrt text: {fast['text']!r}\nHF text:      {hf['text']!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
