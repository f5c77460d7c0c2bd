"""Cut a loaded full-size model down to one rank's part.

The checkpoint's tensors are loaded full-size but lazily (memory-mapped files, GGML bytes,
packed integer words): nothing is copied until a layer is cut, and each layer is cut and
then processed (repacked for its kernel, moved to its GPU) before the next one, so host
memory holds one layer's temporaries at a time.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from quantrt.parallel.comm import TPGroup
from quantrt.parallel.plan import attention_cuts, coarsest_unit, mlp_cuts, split_range


def _n_unit(layer: nn.Module) -> int:
    return layer.method.tp_units(layer)[0]


def _k_unit(layer: nn.Module) -> int:
    return layer.method.tp_units(layer)[1]


def shard_layers(model: nn.Module, tp: TPGroup) -> Iterator[list[nn.Module]]:
    """Cut every decoder layer; yields the linear layers just cut (ready to process)."""
    cfg, info = model.cfg, tp.info
    fused = bool(model.fused_checkpoint)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_cut, o_cut = attention_cuts(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, fused,
                                        _n_unit(attn.qkv_proj), _k_unit(attn.o_proj), info)
        attn.qkv_proj.shard_tp(qkv_cut)
        attn.o_proj.shard_tp(o_cut, tp)
        q0, q1 = o_cut.wanted
        k_rows = qkv_cut.wanted[0][1] if fused else qkv_cut.wanted[1][0]
        attn.num_heads = (q1 - q0) // cfg.head_dim
        attn.num_kv_heads = (k_rows[1] - k_rows[0]) // cfg.head_dim
        gu_cut, down_cut = mlp_cuts(cfg.intermediate_size, fused, _n_unit(mlp.gate_up_proj),
                                    _k_unit(mlp.down_proj), info)
        mlp.gate_up_proj.shard_tp(gu_cut)
        mlp.down_proj.shard_tp(down_cut, tp)
        yield [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]


def vocab_unit(model: nn.Module, tie: bool) -> int:
    return 1 if tie else _n_unit(model.lm_head)


def shard_vocab(model: nn.Module, tp: TPGroup, tie: bool) -> None:
    """Vocab-parallel embedding and lm_head: the same rows on both (a tied head reads the
    embedding's), logits gathered from every rank."""
    vocab = model.cfg.vocab_size
    unit = coarsest_unit(vocab, tp.size, vocab_unit(model, tie))
    ranges = [split_range(vocab, unit, tp.size, r) for r in range(tp.size)]
    start, end = ranges[tp.rank]
    model.embed_tokens.shard_tp(start, end, tp)
    if not tie:
        from quantrt.parallel.plan import column_cut

        model.lm_head.shard_tp(column_cut([[(start, end)]], [vocab], unit))
    model.lm_head.tp_gather = tp
    model.tp_vocab_widths = [b - a for a, b in ranges]


def local_kv_heads(model: nn.Module) -> int:
    """KV heads of this rank's attention layers (the KV cache's width)."""
    return model.layers[0].self_attn.num_kv_heads if len(model.layers) else model.cfg.num_kv_heads
