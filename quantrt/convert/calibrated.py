"""Calibrated conversion (GPTQ, AWQ), one decoder layer at a time.

The model skeleton is built by transformers on the meta device (no memory); each decoder
layer in turn is materialised from the source, fed the calibration hidden states, has its
linears quantized, runs forward once more with the *quantized* weights to make the next
layer's inputs (so later layers compensate for earlier errors, as GPTQ does), is written
out and dropped.  Memory: one layer's weights + the calibration activations.
"""
from __future__ import annotations

import os
import sys

import torch

from quantrt.convert.intq import IntWeight, rtn
from quantrt.convert.request import ConvertRequest
from quantrt.convert.source import ConvertSource, GGUFSource, is_linear_weight
from quantrt.convert.writer_base import Writer
from quantrt.errors import ConfigError, UnsupportedError

ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
AWQ_TOKENS = 2048   # calibration rows kept per linear for AWQ's scale and clip searches
BATCH = 4           # sequences per forward


def check_calibration(req: ConvertRequest, src: ConvertSource) -> None:
    archs = src.config.get("architectures") or []
    if not any(a in ARCHS for a in archs):
        raise UnsupportedError(f"--algo {req.algo} runs on {', '.join(ARCHS)}, not {archs}",
                               where=src.path, hint="use --algo rtn")
    calib_ids(req, src)  # tokenizes now: a text too short fails before any work


def _tokenizer(src: ConvertSource):
    from quantrt.tokenizer import Tokenizer

    if isinstance(src, GGUFSource):
        return Tokenizer.from_gguf_metadata(src.gguf_metadata, src.path)
    return Tokenizer.from_pretrained_dir(src.path)


def calib_ids(req: ConvertRequest, src: ConvertSource) -> torch.Tensor:
    """[samples, seqlen] token ids: evenly spaced windows of the calibration text."""
    if req.calib is None:
        from quantrt.convert.calib_text import DEFAULT_TEXT as text
    else:
        try:
            with open(req.calib, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ConfigError("calibration text is not UTF-8", where=req.calib) from None
    ids = _tokenizer(src).encode(text, add_special_tokens=False)
    t = req.calib_seqlen
    if len(ids) < t:
        raise ConfigError(f"calibration text has {len(ids)} tokens, fewer than one sample of "
                          f"--calib-seqlen {t}", where=req.calib or "built-in text",
                          hint="use a longer text or a smaller --calib-seqlen")
    n = req.calib_samples
    if len(ids) < n * t:
        # Overlapping windows repeat the same tokens: GPTQ's Hessian then has the rank of
        # the text, not of n * t tokens, and fits it instead of the model's inputs (the
        # 1k-token built-in text made 4-bit GPTQ no better than RTN on held-out text).
        sys.stderr.write(f"warning: the calibration text has {len(ids)} tokens, fewer than "
                         f"--calib-samples {n} x --calib-seqlen {t}: samples overlap; a text "
                         f"of {n * t}+ tokens (--calib FILE) calibrates better\n")
    starts = torch.linspace(0, len(ids) - t, n).round().long().unique()
    return torch.stack([torch.tensor(ids[s:s + t]) for s in starts.tolist()])


def _skeleton(config: dict):
    import transformers

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items()
                                               if k not in ("torch_dtype", "dtype")})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    rotary = type(model.model.rotary_emb)(config=cfg)  # real buffers, on the CPU
    return model, rotary


class _Stop(Exception):
    """Raised by a collector once its linears have seen a batch: the rest of the layer's
    forward would be wasted work (true-sequential GPTQ runs up to 4 partial forwards)."""


def _forward(layer, hidden: torch.Tensor, pe) -> torch.Tensor | None:
    out = []
    for b in range(0, hidden.shape[0], BATCH):
        h = hidden[b:b + BATCH]
        pos = torch.arange(h.shape[1])[None].expand(h.shape[0], -1)
        try:
            r = layer(h, attention_mask=None, position_ids=pos,
                      position_embeddings=(pe[0].expand(h.shape[0], -1, -1),
                                           pe[1].expand(h.shape[0], -1, -1)))
        except _Stop:
            continue
        out.append(r[0] if isinstance(r, tuple) else r)
    return torch.cat(out) if out else None


class _Collector:
    """Forward hooks on named linears: GPTQ Hessians, or AWQ input samples."""

    def __init__(self, layer, names, mode: str, seed: int, stop: bool = False,
                 batches: int = 1) -> None:
        self.mode, self.data, self.count = mode, {}, {}
        self.per_batch = -(-AWQ_TOKENS // batches)  # AWQ: rows from every batch alike
        self.gen = torch.Generator().manual_seed(seed)
        mods = dict(layer.named_modules())
        self.names = {n for n in names if n in mods}
        self.stop, self.seen = stop, set()
        self.last = None  # (input tensor, its X^T X): q/k/v and gate/up share one input
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name):
        def fn(module, args, output):
            x = args[0]
            if self.mode == "gptq":
                if self.last is None or self.last[0] is not x:
                    x2 = x.reshape(-1, x.shape[-1]).float()
                    self.last = (x, x2.t() @ x2, x2.shape[0])
                h = self.data.get(name)
                self.data[name] = self.last[1] + (h if h is not None else 0)
                self.count[name] = self.count.get(name, 0) + self.last[2]
            else:
                x = x.reshape(-1, x.shape[-1]).float()
                keep = torch.randperm(x.shape[0], generator=self.gen)[:self.per_batch]
                self.data.setdefault(name, []).append(x[keep])
            self.seen.add(name)
            if self.seen == self.names:
                self.seen, self.last = set(), None
                if self.stop:
                    raise _Stop
        return fn

    def result(self):
        for h in self.handles:
            h.remove()
        if self.mode == "gptq":
            return {n: 2 * h / self.count[n] for n, h in self.data.items()}
        return {n: torch.cat(v)[:AWQ_TOKENS] for n, v in self.data.items()}


def _quantize_layer(req: ConvertRequest, layer, hidden, pe, scale_dtype) -> dict[str, IntWeight]:
    from quantrt.convert.gptq_algo import gptq_quantize

    mods = dict(layer.named_modules())
    linears = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear)]
    result: dict[str, IntWeight] = {}
    if req.algo == "gptq":
        groups = SEQUENTIAL if req.true_sequential else (tuple(linears),)
        rest = [n for n in linears if not any(n in g for g in groups)]
        for group in [*groups, tuple(rest)]:
            group = [n for n in group if n in mods]
            if not group:
                continue
            col = _Collector(layer, group, "gptq", 0, stop=True)
            _forward(layer, hidden, pe)
            hs = col.result()
            for n in group:
                w = mods[n].weight
                iw = gptq_quantize(w.float(), hs[n], req.bits, req.group_size, req.sym,
                                   req.act_order, req.damp, scale_dtype)
                w.data = iw.dequantize().to(w.dtype)
                result[n] = iw
        return result
    from quantrt.convert.awq_algo import awq_layer

    col = _Collector(layer, linears, "awq", 0, batches=-(-hidden.shape[0] // BATCH))
    _forward(layer, hidden, pe)
    awq_layer(layer, col.result(), req.bits, req.group_size, scale_dtype,
              scales=req.awq_scales, clip_qk=req.awq_clip_qk)
    for n in linears:
        w = mods[n].weight
        iw = rtn(w.float(), req.bits, req.group_size, False, scale_dtype)
        w.data = iw.dequantize().to(w.dtype)
        result[n] = iw
    return result


@torch.no_grad()
def run_calibrated(req: ConvertRequest, src: ConvertSource, writer: Writer, show: bool) -> None:
    from quantrt.convert.pipeline import emit, progress_bar

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    ids = calib_ids(req, src)
    model, rotary = _skeleton(src.config)
    scale_dtype = getattr(writer, "scale_dtype", torch.float16)
    for name in src.global_names():
        emit(src, writer, name)
    hidden = src.get("model.embed_tokens.weight")[ids]
    pos = torch.arange(ids.shape[1])[None]
    pe = rotary(hidden[:1], pos)
    n_layers = src.num_layers()
    for i in progress_bar(range(n_layers), n_layers, f"{req.algo} -> {req.method}", show):
        prefix = f"model.layers.{i}."
        layer = model.model.layers[i]
        layer.to_empty(device="cpu")
        state = {n[len(prefix):]: src.get(n) for n in src.layer_names(i)}
        layer.load_state_dict(state, strict=True)
        layer.float()
        quantized = _quantize_layer(req, layer, hidden, pe, scale_dtype)
        hidden = _forward(layer, hidden, pe)
        params = dict(layer.named_parameters())
        for name in src.layer_names(i):
            local = name[len(prefix):]
            module = local.removesuffix(".weight")
            if is_linear_weight(name, src.shape(name)) and module in quantized:
                iw = quantized[module]
                writer.add_linear(name, iw.dequantize(), iw)
            else:  # norms (AWQ folded scales into them), biases
                writer.add_tensor(name, params[local].detach())
        layer.to("meta")
