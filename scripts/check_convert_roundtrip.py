"""Round trips "our writer -> the reference library's loader": the library reads a checkpoint
written by ``quantrt convert`` and its dequantized weights are compared with ours.

    python scripts/check_convert_roundtrip.py prepare WORK      # system python: write + ours
    /work/venvs/gptqmodel/bin/python scripts/check_convert_roundtrip.py check gptqmodel WORK
    ... autoawq | llmcompressor | bnb | hqq (their venvs), gguf (system python)
    python scripts/check_convert_roundtrip.py report WORK

``prepare`` converts a small random Llama (2 layers, hidden 128, intermediate 256, 4 heads,
2 KV heads) into every format below and stores our dequantized linears
(quantrt.convert's reference math, float32) in ``ours-NAME.safetensors``.  ``check LIB``
loads each of that library's checkpoints with the library's own loader, reads every
quantized linear's weight back as the library computes it, and writes ``result-NAME.json``:
elements that differ from ours rounded to the library's dtype, and the max abs diff.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# name -> (library, --to, options)
CASES = {
    "gptq_4bit_g32_sym": ("gptqmodel", "gptq", dict(algo="rtn", group_size=32)),
    "gptq_4bit_g64_asym": ("gptqmodel", "gptq", dict(algo="rtn", group_size=64, sym=False)),
    "gptq_4bit_g64_asym_autogptq": ("autogptq", "gptq", dict(algo="rtn", group_size=64,
                                                             sym=False)),
    "gptq_8bit_gcol_sym": ("gptqmodel", "gptq", dict(algo="rtn", bits=8, group_size=-1)),
    "gptq_3bit_g64_asym": ("gptqmodel", "gptq", dict(algo="rtn", bits=3, group_size=64,
                                                     sym=False)),
    "awq_gemm_g64": ("autoawq", "awq", dict(algo="rtn", group_size=64)),
    "ct_w4a16_g32_sym": ("llmcompressor", "ct-w4a16", dict(group_size=32)),
    "ct_w4a16_g64_asym": ("llmcompressor", "ct-w4a16", dict(group_size=64, sym=False)),
    "ct_w8a16_channel": ("llmcompressor", "ct-w8a16", {}),
    "ct_fp8_dynamic": ("llmcompressor", "ct-fp8", {}),
    "bnb_nf4_dq": ("bnb", "bnb-nf4", dict(double_quant=True)),
    "bnb_int8": ("bnb", "bnb-int8", {}),
    "hqq_4bit_g64": ("hqq", "hqq", dict(group_size=64)),
    "gguf_q4_0": ("gguf", "gguf", dict(gguf_type="Q4_0")),
    "gguf_q8_0": ("gguf", "gguf", dict(gguf_type="Q8_0")),
    "gguf_q5_1": ("gguf", "gguf", dict(gguf_type="Q5_1")),
}


def prepare(work: Path) -> None:
    sys.path.insert(0, str(REPO))
    from safetensors.torch import save_file

    from quantrt.convert import ConvertRequest, convert
    from quantrt.convert.source import is_linear_weight, open_source
    from tests.tiny_models import make_tiny_model, save_bpe_tokenizer

    work.mkdir(parents=True, exist_ok=False)
    src = make_tiny_model(work / "src", hidden_size=128, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2)
    save_bpe_tokenizer(src)
    for name, (_, method, kw) in CASES.items():
        out = work / (f"{name}.gguf" if method == "gguf" else name)
        convert(str(src), out, ConvertRequest(method, **kw), progress=False)
        s = open_source(str(out))
        save_file({n: s.get(n).contiguous() for n in s.names if is_linear_weight(n, s.shape(n))},
                  str(work / f"ours-{name}.safetensors"))
        print("wrote", out.name)


def _load_gptqmodel(path: Path) -> dict[str, torch.Tensor]:
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    return {f"{m}.weight": mod.dequantize_weight().T.contiguous()
            for m, mod in model.model.named_modules()
            if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight")}


@torch.no_grad()
def _load_autogptq(path: Path) -> dict[str, torch.Tensor]:
    """auto-gptq 0.7.1's qlinear_cuda.QuantLinear (its CPU torch path honours g_idx) with
    our tensors; the weight read out by a float16 forward of the identity (exact)."""
    from auto_gptq.nn_modules.qlinear.qlinear_cuda import QuantLinear
    from safetensors.torch import load_file

    q = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(path / "model.safetensors"))
    out = {}
    for name in tensors:
        if not name.endswith(".qweight"):
            continue
        m = name.removesuffix(".qweight")
        k, n = tensors[f"{m}.g_idx"].shape[0], tensors[f"{m}.scales"].shape[1]
        ql = QuantLinear(q["bits"], q["group_size"], k, n, bias=False)
        for buf in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(ql, buf).copy_(tensors[f"{m}.{buf}"])
        out[f"{m}.weight"] = ql(torch.eye(k, dtype=torch.float16)).T.contiguous()
    return out


def _load_autoawq(path: Path) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(REPO / "scripts" / "fixtures"))
    from awq.utils.packing_utils import dequantize_gemm
    from make_awq import reload_gemm

    model, qcfg = reload_gemm(path)
    return {f"{m}.weight": dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, 4,
                                           qcfg.q_group_size).T.contiguous()
            for m, mod in model.named_modules() if hasattr(mod, "qzeros")}


def _load_transformers(path: Path, **kw) -> dict[str, torch.Tensor]:
    """compressed-tensors (decompressed by transformers' loader) and bitsandbytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()
    out = {}
    for m, mod in model.named_modules():
        if ".layers." not in m or not hasattr(mod, "weight") or mod.weight.dim() != 2:
            continue
        kind = type(mod).__name__
        if kind == "Linear4bit":
            import bitsandbytes as bnb

            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        elif kind == "Linear8bitLt":
            import bitsandbytes as bnb

            w = bnb.functional.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB)
        elif mod.weight.dtype == torch.float8_e4m3fn:  # compressed-tensors FP8 stays FP8
            w = mod.weight.float() * mod.weight_scale.float()
        else:
            w = mod.weight.detach()
        out[f"{m}.weight"] = w
    return out


def _ct_dense():
    """Decompress to dense float weights on load (run_compressed keeps packed modules)."""
    from transformers import CompressedTensorsConfig

    return CompressedTensorsConfig(run_compressed=False)


def _load_hqq(path: Path) -> dict[str, torch.Tensor]:
    from hqq.core.quantize import HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    model = AutoHQQHFModel.from_quantized(str(path), compute_dtype=torch.float16, device="cpu")
    return {f"{m}.weight": mod.dequantize().reshape(mod.meta["shape"])
            for m, mod in model.named_modules() if isinstance(mod, HQQLinear)}


def _load_gguf(path: Path) -> dict[str, torch.Tensor]:
    """gguf-py's reader and dequantizer (bit-exact with ggml), names and Q/K rows mapped
    back to HF by quantrt's GGUF source (which is what it checks: the rest is gguf-py)."""
    import gguf
    import numpy as np

    sys.path.insert(0, str(REPO))
    from quantrt.convert.source import GGUFSource, is_linear_weight

    src = GGUFSource(str(path))
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name in src.names:
        if not is_linear_weight(name, src.shape(name)):
            continue
        t = tensors[src._gguf_name[name]]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        out[name] = src.unpermute(name, w.reshape(src.shape(name)).float())
    return out


LOADERS = {"gptqmodel": _load_gptqmodel, "autogptq": _load_autogptq, "autoawq": _load_autoawq, "hqq": _load_hqq,
           "llmcompressor": lambda p: _load_transformers(p, quantization_config=_ct_dense()),
           "bnb": lambda p: _load_transformers(p, device_map="cpu"), "gguf": _load_gguf}


def check(lib: str, work: Path) -> None:
    from safetensors.torch import load_file

    for name, (case_lib, method, _) in CASES.items():
        if case_lib != lib:
            continue
        path = work / (f"{name}.gguf" if method == "gguf" else name)
        ours = load_file(str(work / f"ours-{name}.safetensors"))
        try:
            theirs = LOADERS[lib](path)
        except Exception as exc:  # a library that cannot read our file: the finding
            result = {"loaded": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        else:
            missing = sorted(set(ours) - set(theirs))
            diffs = {}
            for n, w in ours.items():
                if n in theirs:
                    t = theirs[n]
                    d = (t.float() - w.to(t.dtype).float()).abs()
                    diffs[n] = (int((d > 0).sum()), float(d.max()), str(t.dtype))
            result = {"loaded": True, "library_dtype": sorted({v[2] for v in diffs.values()}),
                      "linears_compared": len(diffs), "missing_in_library": missing,
                      "elements_differing": sum(v[0] for v in diffs.values()),
                      "elements": sum(w.numel() for n, w in ours.items() if n in theirs),
                      "max_abs_diff": max((v[1] for v in diffs.values()), default=None)}
        result["library"] = lib
        (work / f"result-{name}.json").write_text(json.dumps(result, indent=1))
        print(name, json.dumps(result))


def report(work: Path) -> None:
    for name in CASES:
        f = work / f"result-{name}.json"
        r = json.loads(f.read_text()) if f.exists() else {"loaded": None}
        if r.get("loaded"):
            print(f"| {name} | {r['library']} | {r['linears_compared']} | "
                  f"{r['elements_differing']} / {r['elements']} | {r['max_abs_diff']:.3g} |")
        else:
            print(f"| {name} | {r.get('library', '-')} | not loaded: {r.get('error', 'not run')} |")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "prepare":
        prepare(Path(sys.argv[2]))
    elif cmd == "check":
        check(sys.argv[2], Path(sys.argv[3]))
    else:
        report(Path(sys.argv[2]))
