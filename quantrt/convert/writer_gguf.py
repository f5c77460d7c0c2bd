"""GGUF the way llama.cpp's ``convert_hf_to_gguf.py`` writes it, quantized by gguf-py.

* architecture: Llama and Mistral -> ``llama``, Qwen2 -> ``qwen2``, Qwen3 -> ``qwen3``;
  tensor names from ``gguf.get_tensor_name_map``; Q/K rows of ``llama`` interleaved
  (llama.cpp rotates adjacent pairs, HF rotates halves);
* 1-D tensors and norms stay F32; every 2-D weight (embedding and output included) gets
  the requested type, quantized with ``gguf.quants.quantize`` (row length % 32 == 0);
* hyper-parameters under ``{arch}.*``; the tokenizer copied key by key from a GGUF
  source, or built from an HF byte-level BPE ``tokenizer.json`` (``gpt2`` model).
Tensors are spooled to a temp file as they arrive (``use_temp_file``), not kept in RAM.
"""
from __future__ import annotations

import json
import os

import torch

from quantrt.convert.intq import IntWeight
from quantrt.convert.writer_base import Writer
from quantrt.errors import UnsupportedError

HF_TO_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
              "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16",
              "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
              "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1"}


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF halves -> llama.cpp pairs: within a head, row 2j <- j and row 2j+1 <- half + j."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFWriter(Writer):
    def __init__(self, req, source, out_dir) -> None:
        import gguf

        super().__init__(req, source, out_dir)
        cfg = source.config
        arch_cls = next((a for a in cfg.get("architectures") or [] if a in HF_TO_ARCH), None)
        if arch_cls is None:
            raise UnsupportedError(f"GGUF output for {cfg.get('architectures')} is not "
                                   "supported", hint="supported: " + ", ".join(HF_TO_ARCH))
        self.arch_name = HF_TO_ARCH[arch_cls]
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch_name)
        self.names = gguf.get_tensor_name_map(arch, int(cfg["num_hidden_layers"]))
        self.qtype = gguf.GGMLQuantizationType[req.gguf_type]
        self.path = os.path.join(out_dir, "model.gguf")  # renamed to OUT when complete
        self.w = gguf.GGUFWriter(self.path, self.arch_name, use_temp_file=True)
        self.heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)

    def _add(self, name: str, t: torch.Tensor, quantize: bool) -> None:
        import gguf
        import numpy as np

        if self.arch_name == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = _permute(t, self.heads)
        elif self.arch_name == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = _permute(t, self.kv_heads)
        gname = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UnsupportedError(f"tensor {name!r} has no GGUF name for {self.arch_name}")
        data = np.ascontiguousarray(t.float().numpy())
        Q = gguf.GGMLQuantizationType
        qtype = self.qtype if quantize and data.ndim == 2 and "norm" not in gname else Q.F32
        if qtype == Q.F32:
            self.w.add_tensor(gname, data, raw_dtype=Q.F32)
        else:
            self.w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self._add(name, t, quantize=True)

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        self._add(name, w, quantize=True)

    def _params(self) -> None:
        import gguf

        cfg = self.source.config
        w = self.w
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(os.path.basename(os.path.normpath(self.source.path)))
        w.add_block_count(int(cfg["num_hidden_layers"]))
        w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
        w.add_embedding_length(int(cfg["hidden_size"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(self.heads)
        w.add_head_count_kv(self.kv_heads)
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        rope = cfg.get("rope_parameters") or {}
        w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // self.heads)
        if head_dim != int(cfg["hidden_size"]) // self.heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if self.arch_name == "llama":
            w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_rope_dimension_count(head_dim)
        w.add_file_type(gguf.LlamaFileType[FILE_TYPES[self.req.gguf_type]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def _tokenizer(self) -> None:
        meta = self.source.gguf_metadata
        if meta is not None:
            _copy_tokenizer(self.w, meta)
        else:
            _hf_tokenizer(self.w, self.source.path, self.source.config)

    def finish(self) -> None:
        self._params()
        self._tokenizer()
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()


def _copy_tokenizer(w, meta: dict) -> None:
    adders = {"tokenizer.ggml.model": w.add_tokenizer_model, "tokenizer.ggml.pre": w.add_tokenizer_pre,
              "tokenizer.ggml.tokens": w.add_token_list, "tokenizer.ggml.token_type": w.add_token_types,
              "tokenizer.ggml.scores": w.add_token_scores, "tokenizer.ggml.merges": w.add_token_merges,
              "tokenizer.ggml.bos_token_id": w.add_bos_token_id,
              "tokenizer.ggml.eos_token_id": w.add_eos_token_id,
              "tokenizer.ggml.unknown_token_id": w.add_unk_token_id,
              "tokenizer.ggml.padding_token_id": w.add_pad_token_id,
              "tokenizer.ggml.add_bos_token": w.add_add_bos_token,
              "tokenizer.ggml.add_eos_token": w.add_add_eos_token,
              "tokenizer.chat_template": w.add_chat_template}
    for key, add in adders.items():
        if key in meta:
            value = meta[key]
            add(list(value) if isinstance(value, (list, tuple)) else value)


def _hf_tokenizer(w, path: str, cfg: dict) -> None:
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise UnsupportedError("GGUF output needs the source's tokenizer.json", where=path)
    with open(tj, encoding="utf-8") as f:
        raw = json.load(f)
    model = raw.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedError(f"GGUF output supports byte-level BPE tokenizers, this one is "
                               f"{model.get('type')!r}", where=tj)
    vocab = dict(model["vocab"])
    added = {a["content"]: (a["id"], a.get("special", False)) for a in raw.get("added_tokens", [])}
    for text, (i, _) in added.items():
        vocab[text] = i
    size = max(int(cfg["vocab_size"]), max(vocab.values()) + 1)
    tokens, types = token_table(vocab, size, {t: special for t, (_, special) in added.items()})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise UnsupportedError("the BPE tokenizer has no merges, and llama.cpp's (and "
                               "transformers') GGUF readers refuse such a vocabulary", where=tj)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tc_path = os.path.join(path, "tokenizer_config.json")
    tc = json.load(open(tc_path, encoding="utf-8")) if os.path.isfile(tc_path) else {}

    def tok_id(key: str):
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if v is not None else None

    bos = tok_id("bos_token") if tok_id("bos_token") is not None else cfg.get("bos_token_id")
    eos = tok_id("eos_token") if tok_id("eos_token") is not None else cfg.get("eos_token_id")
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if isinstance(eos, list):
        eos = eos[0]
    if eos is not None:
        w.add_eos_token_id(int(eos))
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)) and bos is not None)
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])


def token_table(vocab: dict[str, int], size: int, added: dict[str, bool]
                ) -> tuple[list[str], list[int]]:
    """llama.cpp's token list and types for ids ``0..size-1``: ``added`` maps each added
    token to whether it is special (CONTROL) or not (USER_DEFINED); ids without a token
    become UNUSED ``[PADi]`` entries."""
    import gguf

    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i)
        tokens.append(f"[PAD{i}]" if text is None else text)
        types.append(gguf.TokenType.UNUSED if text is None else
                     gguf.TokenType.NORMAL if text not in added else
                     gguf.TokenType.CONTROL if added[text] else gguf.TokenType.USER_DEFINED)
    return tokens, types
