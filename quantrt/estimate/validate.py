"""Set an estimate against what a model really takes once loaded: run on a GPU with

    python -m quantrt.estimate.validate SOURCE [--quantization M] [--tokens 512]

or call :func:`validate`.  :func:`measure` loads the model with :func:`quantrt.load`, reads
its weight bytes (as ``quantrt inspect`` counts them), the KV bytes per token of the engine's
cache, the allocator's peak over one prefill of ``tokens`` tokens (activations) and then the
memory outside torch's allocator (CUDA context); :func:`validate` estimates the same
configuration (one GPU, one sequence, no CUDA graphs, the loaded compute dtype) and returns
:func:`quantrt.estimate.compare`'s relative errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from quantrt.estimate import compare, estimate

# Room for the one sequence measure() runs; the KV cache is sized explicitly so that the
# engine's default (a share of free memory) does not hide the activation peak.
_KV_BYTES = 256 << 20


def measure(source: str | os.PathLike, quantization: str | None = None, *,
            device: str = "cuda", tokens: int = 512) -> dict[str, Any]:
    """Measured bytes of ``source`` on ``device`` (on CPU: weights and KV per token only)."""
    import torch

    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.engine.model_runner import kv_bytes_per_token
    from quantrt.engine.sequence import SamplingParams
    from quantrt.inspect_report import build_report
    from quantrt.loader import load

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.synchronize()
    lm = load(source, quantization, device=device)
    out: dict[str, Any] = {
        "loaded_bytes": build_report(lm)["loaded_weight_bytes"],
        "kv_bytes_per_token": kv_bytes_per_token(lm, lm.dtype),
        "compute_dtype": str(lm.dtype).removeprefix("torch."),
    }
    if not cuda:
        return out
    engine = LLMEngine(lm, EngineConfig(max_num_seqs=1, max_num_batched_tokens=tokens,
                                        kv_cache_memory=_KV_BYTES))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(lm.device)
    base = torch.cuda.memory_allocated(lm.device)
    prompt = [i % lm.config.vocab_size for i in range(tokens - 1)]
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    torch.cuda.synchronize()
    out["activation_bytes"] = torch.cuda.max_memory_allocated(lm.device) - base
    # After a forward pass: the context has loaded its kernels and cuBLAS its handles.
    free, total = torch.cuda.mem_get_info(lm.device)
    out["overhead_bytes"] = total - free - torch.cuda.memory_reserved(lm.device)
    out["total_memory"] = total
    return out


def validate(source: str | os.PathLike, quantization: str | None = None, *,
             device: str = "cuda", tokens: int = 512) -> dict[str, Any]:
    """{"measured": ..., "comparison": {quantity: {estimated, measured, relative_error}}}."""
    measured = measure(source, quantization, device=device, tokens=tokens)
    # The checkpoint's own layout: ``quantization`` only has to agree with it to load.
    est = estimate(source, ["checkpoint"], num_gpus=1, max_num_seqs=1,
                   max_num_batched_tokens=tokens, cuda_graphs=False,
                   compute_dtype=measured["compute_dtype"])
    wanted = ("loaded_bytes", "kv_bytes_per_token", "activation_bytes", "overhead_bytes")
    return {"measured": measured,
            "comparison": compare(est, {k: measured[k] for k in wanted if k in measured})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantrt.estimate.validate",
                                description="Compare quantrt estimate with measured memory.")
    p.add_argument("source")
    p.add_argument("--quantization", "-q", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args(argv)
    json.dump(validate(args.source, args.quantization, device=args.device, tokens=args.tokens),
              sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
