"""The reference AWQ (AutoAWQ 0.2.9's own quantizer) on a model that quantrt also converts,
with the same calibration windows, so that its perplexity can be set beside ours
(BENCHMARKS.md, "Convert: quality on the demo model").

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 /work/venvs/autoawq/bin/python \\
        scripts/reference_autoawq_ppl.py /tmp/cvw/base /tmp/q4/calib_lic.txt OUT
    quantrt eval ppl OUT/fakequant --text /tmp/q4/eval_licenses.txt --ctx 512
    quantrt convert OUT/scaled OUT/awq --to awq --algo rtn --group-size 128
    quantrt eval ppl OUT/awq --text /tmp/q4/eval_licenses.txt --ctx 512

Settings: w_bit 4, q_group_size 128, zero_point True, version GEMM, duo scaling and clip
search on (AutoAWQ's defaults), model in float16 as AutoAWQ loads it (``--dtype float32``
searches in float32: on a CPU without fp16 GEMM, 50 min on 2 threads for the demo model
against ~2.7 h in float16; the final rounding is AutoAWQ's in float16 either way).  Calibration: the
token windows ``quantrt convert --calib FILE --calib-samples N --calib-seqlen T`` uses
(quantrt.convert.calibrated.calib_ids), passed as token lists; AutoAWQ concatenates them
and cuts them back into the same T-token blocks.

Writes
  OUT/scaled     AutoAWQ's scaled and clipped weights before the final rounding (fp16 HF dir)
  OUT/fakequant  the same after AutoAWQ's own pseudo_quantize_tensor: its exact 4-bit weights
  OUT/autoawq_meta.json  settings, versions, CPU time
AutoAWQ's packing (WQLinear_GEMM) asserts in_features % group_size == 0, which the demo
model's 576 = 4.5 x 128 fails, so OUT/awq is packed by quantrt's AWQ writer (round to
nearest of OUT/scaled); OUT/fakequant is what AutoAWQ itself would dequantize to.

Run-time patches, none in the library's files (every one is needed on this model on a CPU):
  * the scale search snapshots the module with ``v.cpu()``, which on CPU aliases the live
    weights that are then scaled in place: the snapshot is made a real copy;
  * partial last groups (K = 576, group 128): AutoAWQ asserts K % group == 0 in its
    quantizer, reshapes the clip search's inputs by group, and computes the scale search's
    per-group weight magnitude over a flat view whose "groups" straddle rows.  Here the
    last group is padded for quantization with a copy of its own first column (min/max
    see only real values, as quantrt's RTN does), the clip search's inputs with zeros (no
    output contribution), and the weight magnitude is taken per row's own groups.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pad_cols(w: torch.Tensor, g: int) -> torch.Tensor:
    """Pad the last dim to a multiple of g with the partial group's first column."""
    k = w.shape[-1]
    pad = (-k) % g
    if not pad:
        return w
    first = w[..., k - k % g:k - k % g + 1]
    return torch.cat([w, first.expand(*w.shape[:-1], pad)], dim=-1)


def _quantizer_cls(group_size: int):
    import awq.quantize.quantizer as aq
    from awq.utils.module import get_op_by_name

    class CpuPartialGroupQuantizer(aq.AwqQuantizer):
        def pseudo_quantize_tensor(self, w):
            k = w.shape[-1]
            if self.group_size <= 0 or k % self.group_size == 0:
                return super().pseudo_quantize_tensor(w)
            wq, scales, zeros = super().pseudo_quantize_tensor(_pad_cols(w, self.group_size))
            return wq[..., :k].contiguous(), scales, zeros

        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale,
                                fp16_output, kwargs={}):
            weight = torch.cat([m.weight for m in linears2scale], dim=0)
            n, k = weight.shape
            g = self.group_size
            if g > 0 and k % g:
                wg = _pad_cols(weight, g).abs().reshape(n, -1, g)
                rel = wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)
                w_mean = rel.reshape(n, -1)[:, :k].mean(0)
            orig = module2inspect.state_dict
            module2inspect.state_dict = lambda *a, **kw: {
                name: v.clone() for name, v in orig(*a, **kw).items()}
            try:
                return super()._compute_best_scale(x, w_mean, x_mean, module2inspect,
                                                   linears2scale, fp16_output, kwargs)
            finally:
                del module2inspect.state_dict

        def _compute_best_clip(self, w, input_feat, **kw):
            k, g = w.shape[1], self.group_size
            if g > 0 and k % g:
                w = _pad_cols(w, g)
                x = input_feat.reshape(-1, k)
                input_feat = torch.nn.functional.pad(x, (0, w.shape[1] - k))
            return super()._compute_best_clip(w, input_feat, **kw)

    orig_apply_clip = aq.apply_clip

    def apply_clip(module, clip_list):
        for name, max_val in clip_list:
            layer = get_op_by_name(module, name)
            k = layer.weight.shape[1]  # max_val: [N, groups, 1]
            layer.weight.data = _pad_cols(layer.weight.data, group_size)
            orig_apply_clip(module, [(name, max_val)])
            layer.weight.data = layer.weight.data[:, :k].contiguous()

    aq.apply_clip = apply_clip  # the name quantize() calls, in the quantizer's module only
    return CpuPartialGroupQuantizer


def _save(model, tok_src: str, out: Path) -> None:
    model.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(tok_src, f)):
            shutil.copy(os.path.join(tok_src, f), out / f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                    help="model dtype during the search (AutoAWQ loads float16)")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists():
        sys.exit(f"error: {out} already exists: choose a new directory")

    import awq
    import transformers
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    from quantrt.convert.calibrated import calib_ids
    from quantrt.convert.request import ConvertRequest
    from quantrt.convert.source import open_source

    req = ConvertRequest("awq", calib=a.calib, calib_samples=a.calib_samples,
                         calib_seqlen=a.calib_seqlen, group_size=a.group_size)
    ids = calib_ids(req, open_source(a.base))
    quant_config = dict(w_bit=4, q_group_size=a.group_size, zero_point=True, version="GEMM")
    dtype = getattr(torch, a.dtype)

    t0 = time.time()
    model = AutoAWQForCausalLM.from_pretrained(a.base, torch_dtype=dtype, device_map="cpu")
    tok = AutoTokenizer.from_pretrained(a.base)
    # export_compatible: scale and clip, but keep nn.Linear (AutoAWQ's packing cannot hold
    # a partial group); the final rounding below is AutoAWQ's pseudo_quantize_tensor.
    model.quantize(tok, quant_config=quant_config, calib_data=ids.tolist(),
                   max_calib_samples=ids.shape[0], max_calib_seq_len=ids.shape[1],
                   export_compatible=True, quantizer_cls=_quantizer_cls(a.group_size))
    search_s = time.time() - t0
    hf = model.model
    hf.to(torch.float16)
    out.mkdir(parents=True)
    _save(hf, a.base, out / "scaled")
    quantizer = model.quantizer
    n_linears = 0
    with torch.no_grad():
        for layer in model.get_model_layers(hf):
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.data = quantizer.pseudo_quantize_tensor(m.weight.data)[0]
                    n_linears += 1
    _save(hf, a.base, out / "fakequant")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    meta = {
        "base": os.path.abspath(a.base), "calib": os.path.abspath(a.calib),
        "calib_windows": list(ids.shape), "quant_config": quant_config,
        "duo_scaling": True, "apply_clip": True, "search_dtype": a.dtype,
        "quantized_linears": n_linears, "search_wall_s": round(search_s, 1),
        "user_cpu_s": round(ru.ru_utime, 1), "peak_rss_mb": round(ru.ru_maxrss / 1024),
        "threads": torch.get_num_threads(),
        "versions": {"autoawq": awq.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
    }
    (out / "autoawq_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
