"""Test-side HF -> GGUF converter that follows llama.cpp's ``convert_hf_to_gguf.py`` conventions.

It turns one of our tiny HF checkpoints (``tests/tiny_models.py``) into the GGUF that
llama.cpp's converter would write for it, so the GGUF loader can be checked against the
safetensors loader and against transformers' GGUF loader on the very same weights:

* architecture: ``LlamaForCausalLM`` and ``MistralForCausalLM`` both become GGUF arch
  ``llama`` (llama.cpp has no separate ``mistral`` text arch; it registers Mistral on its
  Llama converter), ``Qwen2ForCausalLM`` -> ``qwen2``, ``Qwen3ForCausalLM`` -> ``qwen3``,
  ``Gemma2ForCausalLM`` -> ``gemma2``, ``Gemma3ForCausalLM`` -> ``gemma3``,
  ``Phi3ForCausalLM`` -> ``phi3``;
* Gemma: every ``*norm.weight`` gets +1 (HF's RMSNorm multiplies by 1 + w, llama.cpp's by
  w), ``lm_head.weight`` is never written (tied), Gemma 3's ``token_embd`` keeps only the
  tokenizer's rows (``len(vocab) + len(added_tokens)`` of tokenizer.json, as the converter
  counts them); the token list is written at that length too (the converter's gpt2 path would
  pad it to ``vocab_size``, a file llama.cpp refuses; real Gemma 3 GGUFs agree in length).
  llama.cpp stores no query scale, rope base (Gemma 2) or sliding pattern and assumes its
  own (1/sqrt(head_dim) but hidden/heads for the 27B models; 10000; every 2nd / 6th layer
  global), so configs that differ are refused rather than written wrong;
* Phi-3: ``qkv_proj`` / ``gate_up_proj`` stay fused (``attn_qkv``, ``ffn_up``); longrope
  factors go to ``rope_factors_short/long.weight`` with ``rope.scaling.attn_factor`` and
  ``rope.scaling.original_context_length``; ``attention.sliding_window`` is 0 without one;
* tensor names from ``gguf.get_tensor_name_map(arch, n_layers)``;
* Q/K rows (weights and biases) permuted for arch ``llama`` only: llama.cpp's rotary kernel
  rotates adjacent pairs, HF rotates halves, so every head's rows are interleaved
  ``[h0, h_half, h1, h_half+1, ...]``; the K permutation uses the KV head count;
* 1-D tensors and ``*_norm.weight`` stay F32, every other (2-D) weight gets ``qtype``
  (quantized with ``gguf.quants.quantize``); ``output.weight`` is absent when tied;
* hyper-parameters under ``{arch}.*`` as llama.cpp's ``TextModel``/``LlamaModel`` write them
  (``attention.key_length``/``value_length`` whenever ``config.json`` names a ``head_dim``,
  ``vocab_size`` for arch ``llama``), ``general.file_type`` and ``general.quantization_version``;
* the tokenizer as ``tokenizer.ggml.model = "gpt2"``: every id below ``vocab_size``
  (``[PAD{i}]``/UNUSED for ids the tokenizer lacks, CONTROL for special added tokens),
  merges from ``tokenizer.json``, bos/eos ids, ``add_bos_token`` and a chat template.

What it does not do (because llama.cpp's converter does not, or our tiny models never need
it): sentencepiece vocabularies, rope scaling keys of the Llama family, the pre-tokenizer
hash lookup (the caller names ``tokenizer.ggml.pre``; our byte-level test tokenizer splits
like GPT-2).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from quantrt.convert.writer_gguf import token_table

Q = gguf.GGMLQuantizationType

# HF class name -> GGUF architecture (as llama.cpp's converter registers them)
HF_TO_GGUF_ARCH = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
}
PERMUTED_ARCHS = {gguf.MODEL_ARCH.LLAMA}
GEMMA_ARCHS = {gguf.MODEL_ARCH.GEMMA2: (2, 46, 10000.0), gguf.MODEL_ARCH.GEMMA3: (6, 62, None)}
NORM_SHIFT = 1.0  # Gemma: llama.cpp's norm weight = HF's + 1

# tensor type of the 2-D weights -> general.file_type
FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    Q.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,  # a type without a fused GPU kernel
}

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ bos_token }}{{ message['role'] }}\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)


def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF (rotate-halves) row order -> llama.cpp (rotate-adjacent-pairs) row order.

    Rows of one head are ``[first half | second half]``; afterwards row ``2j`` is the old
    row ``j`` and row ``2j + 1`` the old row ``half + j``.  Works for weights and biases."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _head_counts(cfg: dict[str, Any]) -> tuple[int, int]:
    heads = int(cfg["num_attention_heads"])
    return heads, int(cfg.get("num_key_value_heads") or heads)


def _rope_theta(cfg: dict[str, Any]) -> float | None:
    # transformers 5 writes rope_parameters: {rope_theta, rope_type}; 4.x writes rope_theta
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return None if theta is None else float(theta)


def _llama3_rope_factors(cfg: dict[str, Any]) -> torch.Tensor | None:
    """Divisors per rotary frequency, computed the way llama.cpp's converter does for
    rope_type llama3 (wavelengths above the low-frequency cut get `factor`, below the
    high-frequency cut 1, and a smooth blend in between)."""
    params = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    if params.get("rope_type", params.get("type")) != "llama3":
        return None
    heads, _ = _head_counts(cfg)
    dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    base = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    factor, lo, hi = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_ctx = float(params["original_max_position_embeddings"])
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _encode_tensor(data: np.ndarray, qtype: Q) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F32:
        return data
    return gguf.quants.quantize(data, qtype)


def _checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for part in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(part)))
    if not out:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return out


def _write_tokenizer(w: gguf.GGUFWriter, model_dir: Path, cfg: dict[str, Any], pre: str,
                     chat_template: str | None, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer ids reach {max(vocab.values())}, model vocab is {vocab_size}")
    specials = {i for i, at in tok.added_tokens_decoder.items() if at.special}
    tokens, types = token_table(vocab, vocab_size, {t: i in specials
                                                    for t, i in tok.get_added_vocab().items()})

    raw = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    merges = raw.get("model", {}).get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if not merges:
        # llama.cpp would write none and its BPE loader (and transformers') then refuse the file
        raise ValueError("the tokenizer has no BPE merges; a gpt2 GGUF vocabulary needs them")

    bos = tok.bos_token_id if tok.bos_token_id is not None else cfg.get("bos_token_id")
    eos = tok.eos_token_id if tok.eos_token_id is not None else cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    probe = tok("a").input_ids
    add_bos = bos is not None and probe[:1] == [bos]

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if eos is not None:
        w.add_eos_token_id(int(eos))
    if tok.pad_token_id is not None:
        w.add_pad_token_id(int(tok.pad_token_id))
    w.add_add_bos_token(bool(add_bos))
    template = chat_template or tok.chat_template or DEFAULT_CHAT_TEMPLATE
    w.add_chat_template(template)


def convert_hf_to_gguf(model_dir: str | Path, out_path: str | Path, qtype: Q | str = Q.F32, *,
                       tokenizer_pre: str = "gpt-2", chat_template: str | None = None,
                       name: str | None = None, arch_name: str | None = None) -> Path:
    """Write ``out_path`` from the HF checkpoint in ``model_dir``; return ``out_path``.

    ``qtype`` is the type of every 2-D weight (F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, MXFP4; block types
    need every row length to be a multiple of 32).  ``arch_name`` overrides only the
    ``general.architecture`` string (and the metadata key prefix), e.g. to produce a file that
    declares an architecture llama.cpp itself never writes."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    qtype = Q[qtype] if isinstance(qtype, str) else Q(qtype)
    if qtype not in FILE_TYPES:
        raise ValueError(f"unsupported tensor type {qtype.name}; choose one of "
                         + ", ".join(t.name for t in FILE_TYPES))
    cfg = json.loads((model_dir / "config.json").read_text())
    hf_arch = next((a for a in cfg.get("architectures") or [] if a in HF_TO_GGUF_ARCH), None)
    if hf_arch is None:
        raise ValueError(f"unsupported architectures {cfg.get('architectures')}")
    arch = HF_TO_GGUF_ARCH[hf_arch]
    n_layers = int(cfg["num_hidden_layers"])
    heads, kv_heads = _head_counts(cfg)
    names = gguf.get_tensor_name_map(arch, n_layers)
    permute = arch in PERMUTED_ARCHS
    gemma = arch in GEMMA_ARCHS
    tied = bool(cfg.get("tie_word_embeddings", False)) or gemma
    vocab_size = int(cfg["vocab_size"])
    if arch == gguf.MODEL_ARCH.GEMMA3:
        raw = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        vocab_size = min(vocab_size, len(raw["model"]["vocab"]) + len(raw["added_tokens"]))
    if gemma:
        _check_gemma(cfg, arch)

    w = gguf.GGUFWriter(str(out_path), arch_name or gguf.MODEL_ARCH_NAMES[arch])

    # -- tensors
    for hf_name, t in _checkpoint_tensors(model_dir).items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        t = t.to(torch.float32)
        if gemma and hf_name.endswith("norm.weight"):
            t = t + NORM_SHIFT
        if hf_name == "model.embed_tokens.weight":
            t = t[:vocab_size]
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, heads)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, kv_heads)
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"cannot map tensor {hf_name!r} for arch {gguf.MODEL_ARCH_NAMES[arch]}")
        data = t.numpy()
        ttype = Q.F32 if data.ndim <= 1 or gname.endswith("_norm.weight") else qtype
        if ttype not in (Q.F32, Q.F16) and data.shape[-1] % 32:
            raise ValueError(f"{gname}: row length {data.shape[-1]} is not a multiple of 32 "
                             f"({ttype.name} blocks)")
        w.add_tensor(gname, _encode_tensor(data, ttype), raw_dtype=ttype)

    # -- Llama 3.1 rope scaling: llama.cpp stores per-frequency divisors, not config keys
    if (factors := _llama3_rope_factors(cfg)) is not None:
        w.add_tensor("rope_freqs.weight", factors.numpy(), raw_dtype=Q.F32)

    # -- hyper-parameters
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or model_dir.name)
    if arch == gguf.MODEL_ARCH.PHI3:
        _phi3_params(w, cfg)
    elif gemma:
        _gemma_params(w, cfg, arch)
    else:
        _llama_params(w, cfg, arch)
    w.add_file_type(FILE_TYPES[qtype])

    # -- tokenizer
    _write_tokenizer(w, model_dir, cfg, tokenizer_pre, chat_template, vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _common_params(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    heads, kv_heads = _head_counts(cfg)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    if "max_position_embeddings" in cfg:
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(heads)
    if cfg.get("num_key_value_heads") is not None:
        w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    if cfg.get("head_dim") is not None:
        w.add_key_length(int(cfg["head_dim"]))
        w.add_value_length(int(cfg["head_dim"]))


def _llama_params(w: gguf.GGUFWriter, cfg: dict[str, Any], arch: gguf.MODEL_ARCH) -> None:
    _common_params(w, cfg)
    heads, _ = _head_counts(cfg)
    if (theta := _rope_theta(cfg)) is not None:
        w.add_rope_freq_base(theta)
    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_rope_dimension_count(int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads))


def _check_gemma(cfg: dict[str, Any], arch: gguf.MODEL_ARCH) -> None:
    """Refuse what llama.cpp would run differently from transformers (it has no key for it)."""
    period, wide_layers, theta = GEMMA_ARCHS[arch]
    heads, _ = _head_counts(cfg)
    layers = int(cfg["num_hidden_layers"])
    scalar = int(cfg["hidden_size"]) // heads if layers == wide_layers else int(cfg["head_dim"])
    if cfg.get("query_pre_attn_scalar") != scalar:
        raise ValueError(f"llama.cpp scales queries by 1/sqrt({scalar}), the config by "
                         f"1/sqrt({cfg.get('query_pre_attn_scalar')})")
    want = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)]
    if cfg.get("sliding_window") and cfg.get("layer_types", want) != want:
        raise ValueError(f"llama.cpp makes every {period}th layer global, the config has "
                         f"{cfg.get('layer_types')}")
    if theta is not None and _rope_theta(cfg) not in (None, theta):
        raise ValueError(f"llama.cpp uses rope base {theta} for {arch.name}, the config {_rope_theta(cfg)}")


def _gemma_params(w: gguf.GGUFWriter, cfg: dict[str, Any], arch: gguf.MODEL_ARCH) -> None:
    _common_params(w, cfg)
    if arch == gguf.MODEL_ARCH.GEMMA2:
        w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        w.add_sliding_window(int(cfg["sliding_window"]))
        return
    rope = cfg.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(float(local))
    if cfg.get("attn_logit_softcapping") is not None:
        raise ValueError("Gemma 3 has no attention soft-capping (llama.cpp's converter asserts it)")
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if cfg.get("sliding_window"):
        w.add_sliding_window(int(cfg["sliding_window"]))


def _phi3_params(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    _common_params(w, cfg)
    heads, _ = _head_counts(cfg)
    rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    orig = int(cfg.get("original_max_position_embeddings") or rope["original_max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(orig)
    partial = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    w.add_rope_dimension_count(int(partial * int(cfg["hidden_size"])) // heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_sliding_window(int(cfg.get("sliding_window") or 0))
    if rope.get("rope_type", rope.get("type")) in ("longrope", "su"):
        scale = int(cfg["max_position_embeddings"]) / orig
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig))
                                        if scale > 1.0 else 1.0)
        for kind in ("long", "short"):
            factors = np.asarray(rope[f"{kind}_factor"], dtype=np.float32)
            w.add_tensor(f"rope_factors_{kind}.weight", factors, raw_dtype=Q.F32)
