"""AWQ (Lin et al., arXiv:2306.00978), our implementation: protect the input channels
that carry large activations by scaling them up before quantization and folding the
inverse scale into the operation that produces the input, then clip each group's range.

For every set of linears that share an input (q/k/v after the input norm, o after v when
shapes allow, gate/up after the post-attention norm, down after up):

* scale search: s = mean|x|^a, or mean|x|^a / mean|w|^(1-a) with |w| relative to its
  group's max (normalised so max*min = 1), for a on a grid in [0, 1);
  the a that minimises ||x W^T - x (Q(W diag(s)) diag(s)^-1)^T|| over the calibration
  tokens wins (a = 0 is plain RTN, so the search never does worse than RTN on them);
* the winner is applied exactly: prev /= s (norm weight, or the rows of v / up), W *= s;
* clip search: per output row and group, the range shrink in [0.2, 1] that minimises
  that group's output error, then each end of the range refined alone (our addition: the
  zero-point format pays for each end separately); q/k are not clipped by default (their
  errors are amplified by the attention softmax, as the AWQ authors found).

Two switches exist because on the demo model (SmolLM2-135M, already Q4_1) the published
recipe recovers far less of asymmetric RTN's perplexity increase than the clip search alone
(BENCHMARKS.md, "Convert: quality"): every linear's output error falls with the searched
scales, yet perplexity rises, and clipping q/k too is what helps most.  ``scales=False``
keeps only the clip search (s = 1, nothing folded into the norms); ``clip_qk=True`` clips
q/k like the other linears.  ``quantrt convert --to awq`` runs scales=False, clip_qk=True
(request.AWQ_DEFAULTS); this function's own defaults are the published recipe.
"""
from __future__ import annotations

import torch
from torch import nn

from quantrt.convert.intq import rtn

GRID = 20
# Shrinks 1, 0.973, ..., 0.2, of both ends at once and then of each end alone.  AutoAWQ
# tries 1 down to 0.55 in steps of 0.05, both ends at once; on the demo model (clip-only,
# q/k clipped, 48 windows) this finer, deeper grid scored 22.28, against 22.61 for 21
# shrinks down to 0.3 and 22.90 for 11 down to 0.5, and refining each end alone on top
# (with the loss over all sampled tokens) 21.49 (BENCHMARKS.md, "Convert: quality").
# Each step costs a fake quantization of the layer: the clip search is the slow part.
CLIP_GRID = 30
CLIP_MIN = 0.2


def fake_quant(w: torch.Tensor, bits: int, group_size: int, scale_dtype) -> torch.Tensor:
    return rtn(w, bits, group_size, False, scale_dtype).dequantize()


def _weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of |w| relative to its group's max |w|, per input channel [K]."""
    n, k = w.shape
    g = k if group_size <= 0 else group_size
    wp = torch.nn.functional.pad(w.abs(), (0, (-k) % g)).reshape(n, -1, g)
    return (wp / (wp.amax(dim=-1, keepdim=True) + 1e-6)).reshape(n, -1)[:, :k].mean(dim=0)


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int,
                 scale_dtype) -> torch.Tensor:
    """Best per-input-channel scale s [K] for linears ``weights`` (each [N_i, K]).

    Two candidate families, as in the AWQ reference code: activation-only
    (s = mean|x|^a) and "duo" (s = mean|x|^a / mean|w/groupmax|^(1-a))."""
    w = torch.cat(weights, dim=0).float()
    ref = x @ w.t()
    x_mean = x.abs().mean(dim=0)
    w_mean = _weight_mean(w, group_size)
    best, best_s = float("inf"), torch.ones_like(x_mean)
    candidates = [x_mean.pow(i / GRID) for i in range(GRID)]
    candidates += [x_mean.pow(i / GRID) / (w_mean.pow(1 - i / GRID) + 1e-4)
                   for i in range(1, GRID)]
    for s in candidates:
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quant(w * s, bits, group_size, scale_dtype) / s
        err = (x @ wq.t() - ref).pow(2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, scale_dtype
                ) -> torch.Tensor:
    """W with each (row, group) clamped to the range [lo, hi] that minimises the group's
    output error on the calibration inputs ``x`` [M, K].

    The error of a group's weight change d is d^T H d with H that group's block of
    X^T X / M: the mean squared output error over the tokens, at a cost independent of
    their number, so every sampled token counts (AutoAWQ scores 512 of them; all 2048
    scored 22.94 against 23.31 on 8 of the demo model's windows).

    First the range shrinks by one ratio (both ends at once, AutoAWQ's search), then each
    end is refined alone with the other held (asymmetric quantization pays for each end
    separately: a group's outliers are rarely equal on both sides).  The current best is
    always a candidate, so each step can only lower the loss."""
    n, k = w.shape
    g = k if group_size <= 0 else group_size
    # A partial last group (K = 576, g = 128) is zero-padded: zeros leave its min/max range
    # (which always holds 0) and its output contribution unchanged, so every group --
    # the partial one included -- is searched at the group size it is quantized with.
    pad = (-k) % g
    xg = torch.nn.functional.pad(x.float(), (0, pad)).reshape(x.shape[0], -1, g)
    hb = torch.einsum("mGi,mGj->Gij", xg, xg) / max(1, x.shape[0])            # [G, g, g]
    wg = torch.nn.functional.pad(w.float(), (0, pad)).reshape(n, -1, g)       # [n, G, g]
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    amax = torch.maximum(-wmin, wmax)
    best = torch.full(wg.shape[:2], float("inf"))
    lo, hi = wmin, wmax

    def consider(lo_c: torch.Tensor, hi_c: torch.Tensor) -> None:
        nonlocal best, lo, hi
        wc = torch.clamp(wg, lo_c[..., None], hi_c[..., None]).reshape(n, -1)
        d = fake_quant(wc, bits, g, scale_dtype).reshape(wg.shape) - wg
        err = (torch.einsum("nGi,Gij->nGj", d, hb) * d).sum(dim=-1)
        better = err < best
        best = torch.where(better, err, best)
        lo, hi = torch.where(better, lo_c, lo), torch.where(better, hi_c, hi)

    shrinks = [1 - (1 - CLIP_MIN) * i / CLIP_GRID for i in range(CLIP_GRID + 1)]
    for t in shrinks:
        consider(torch.maximum(wmin, -amax * t), torch.minimum(wmax, amax * t))
    for t in shrinks:
        consider(wmin * t, hi)
    for t in shrinks:
        consider(lo, wmax * t)
    return torch.clamp(wg, lo[..., None], hi[..., None]).reshape(n, -1)[:, :k]


def _scale_prev(prev: nn.Module, s: torch.Tensor) -> None:
    if isinstance(prev, nn.Linear):  # its output rows feed the scaled input channels
        prev.weight.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.div_(s)
    else:  # RMSNorm-like: one weight per channel
        prev.weight.div_(s)


@torch.no_grad()
def awq_layer(layer: nn.Module, inputs: dict[str, torch.Tensor], bits: int, group_size: int,
              scale_dtype, scales: bool = True, clip_qk: bool = False) -> None:
    """Apply AWQ scales and clipping to one transformers decoder layer in place;
    ``inputs`` maps linear names (``self_attn.q_proj``...) to sampled inputs [M, K].
    ``scales``: run the scale search (else clipping only); ``clip_qk``: clip q/k too."""
    mods = dict(layer.named_modules())
    plan = [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            ("self_attn.v_proj", ["self_attn.o_proj"]),
            ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
            ("mlp.up_proj", ["mlp.down_proj"])]
    for prev_name, names in plan:
        prev = mods.get(prev_name)
        if not scales or prev is None or any(n not in mods for n in names):
            continue
        linears = [mods[n] for n in names]
        if isinstance(prev, nn.Linear) and prev.weight.shape[0] != linears[0].weight.shape[1]:
            continue  # grouped-query attention: v's rows are not o's input channels
        s = search_scale(inputs[names[0]], [m.weight for m in linears], bits, group_size,
                         scale_dtype)
        _scale_prev(prev, s)
        for m in linears:
            m.weight.mul_(s[None, :])
        for n in names:
            inputs[n] = inputs[n] / s  # what these linears now see
    for name, x in inputs.items():
        if not clip_qk and name.endswith(("q_proj", "k_proj")):
            continue
        m = mods[name]
        m.weight.copy_(search_clip(x, m.weight.float(), bits, group_size, scale_dtype))
