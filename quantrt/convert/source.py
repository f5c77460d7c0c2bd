"""The model being converted, seen as float tensors under Hugging Face names.

A source is an HF directory (float safetensors, or a quantized checkpoint that
:mod:`quantrt.convert.source_quantized` expands back to floats) or a GGUF file (dequantized with
quantrt's GGML reference kernels, names mapped back to HF, llama.cpp's Q/K row
permutation undone).  Tensors are read one at a time from memory-mapped files, so a
conversion holds one tensor (or one decoder layer) of the source at once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch

from formats.safetensors_file import SafetensorsCheckpoint
from quantrt.errors import SourceError, UnsupportedError

# Files an HF directory carries besides its weights that a converted copy keeps as is.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# GGUF architectures whose HF config we can write (llama.cpp arch -> HF class, model_type).
GGUF_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
              "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A decoder-layer linear weight: what every method quantizes.  Embeddings, lm_head
    and norms stay in float, as all the reference libraries leave them by default."""
    return (LAYER.match(name) is not None and name.endswith(".weight") and len(shape) == 2
            and "norm" not in name.rsplit(".", 2)[-2])


class ConvertSource:
    """Base: ``config`` (HF config.json without quantization), ``names``, ``shape``, ``get``."""

    path: str
    config: dict[str, Any]
    names: list[str]
    gguf_metadata: dict[str, Any] | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def write_side_files(self, out: str) -> None:
        raise NotImplementedError

    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def layer_names(self, layer: int) -> list[str]:
        prefix = f"model.layers.{layer}."
        return [n for n in self.names if n.startswith(prefix)]

    def global_names(self) -> list[str]:
        return [n for n in self.names if LAYER.match(n) is None]

    def close(self) -> None:
        pass

    def source_int_weight(self, name: str):
        """The linear ``name``'s integer weights as stored, when the source has them."""
        return None

    def int_weight(self, name: str, writer):
        """What an integer writer should write as is (a lossless transcode), else None."""
        from quantrt.convert.transcode import fit, transcodes

        if not transcodes(writer.req):
            return None
        iw = self.source_int_weight(name)
        return None if iw is None else fit(iw, writer.req, name, writer.scale_dtype)


class HFSource(ConvertSource):
    def __init__(self, path: str, raw_config: dict[str, Any]) -> None:
        from formats.safetensors_file import open_checkpoint

        self.path = path
        self.ckpt = open_checkpoint(path)
        self.config = {k: v for k, v in raw_config.items() if k != "quantization_config"}
        tied = bool(raw_config.get("tie_word_embeddings", False))
        self.names = [n for n in self.ckpt.keys() if not n.endswith("rotary_emb.inv_freq")
                      and not (tied and n == "lm_head.weight")]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ckpt.info(name)[1])

    def get(self, name: str) -> torch.Tensor:
        t = self.ckpt.get(name)
        t = t.float() if t.dtype.is_floating_point and t.dtype != torch.float32 else t.clone()
        if isinstance(self.ckpt, SafetensorsCheckpoint):
            # Unmap the file after every tensor: the pages read so far would otherwise stay
            # in our RSS -- a 1B model in one 2.5 GB file reached 3.5 GB peak RSS.
            self.ckpt.close()
        return t

    def write_side_files(self, out: str) -> None:
        for f in SIDE_FILES:
            if os.path.isfile(os.path.join(self.path, f)):
                shutil.copy(os.path.join(self.path, f), os.path.join(out, f))

    def close(self) -> None:
        self.ckpt.close()


class GGUFSource(ConvertSource):
    def __init__(self, path: str) -> None:
        from formats.gguf_file import read_gguf
        from quantrt.config import from_gguf_metadata
        from quantrt.loader import _gguf_names

        self.path = path
        self.gf = read_gguf(path)
        self.gguf_metadata = self.gf.metadata
        cfg = from_gguf_metadata(self.gf.metadata, path)
        if cfg.architecture not in GGUF_ARCHS:
            raise UnsupportedError(f"converting a GGUF of architecture {cfg.architecture!r} is "
                                   "not supported", where=path,
                                   hint="supported: " + ", ".join(GGUF_ARCHS))
        if cfg.rope.rope_type != "default" or "rope_freqs.weight" in self.gf.tensors:
            raise UnsupportedError(f"GGUF rope scaling ({cfg.rope.rope_type}) has no HF config "
                                   "form here", where=path)
        self.cfg = cfg
        self.tied = "output.weight" not in self.gf.tensors
        self.config = _hf_config(cfg, self.tied)
        names = _gguf_names(cfg, path)
        hf_modules = ["model.embed_tokens", "model.norm", "lm_head"] + [
            f"model.layers.{i}.{m}" for i in range(cfg.num_layers) for m in (
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
        reverse = {names.get_name(m): m for m in hf_modules}
        self._gguf_name: dict[str, str] = {}
        for gname in self.gf.tensors:
            base, _, suffix = gname.rpartition(".")
            if base not in reverse:
                raise UnsupportedError(f"GGUF tensor {gname!r} has no HF counterpart", where=path)
            self._gguf_name[f"{reverse[base]}.{suffix}"] = gname
        self.names = sorted(self._gguf_name)
        # Lossless transcodes only when every linear is one integer-grid type: a mixed
        # file (llama.cpp's Q4_0 keeps some tensors in Q6_K...) is re-quantized whole.
        from quantrt.convert.transcode import GGUF_INT_TYPES

        types = {self.ggml_type(n) for n in self.names if is_linear_weight(n, self.shape(n))}
        self.int_type = types.pop() if len(types) == 1 and types <= set(GGUF_INT_TYPES) \
            else None

    def source_int_weight(self, name: str):
        from quantrt.convert.transcode import gguf_int_weight

        if self.int_type is None or not is_linear_weight(name, self.shape(name)):
            return None
        rows, cols = self.shape(name)
        raw = self.unpermute(name, self.raw(name).reshape(rows, -1))
        return gguf_int_weight(raw, self.int_type, rows, cols)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.gf.tensors[self._gguf_name[name]].shape)  # already [rows, cols]

    def ggml_type(self, name: str) -> int:
        return int(self.gf.tensors[self._gguf_name[name]].ggml_type)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's GGML bytes, rows in the file's (llama.cpp) order."""
        return self.gf.tensor(self._gguf_name[name])

    def unpermute(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Undo llama.cpp's Q/K row interleave on anything indexed by output row."""
        from quantrt.loader import unpermute_qk

        if self.cfg.architecture in ("llama", "mistral") and name.endswith(
                ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = self.cfg.num_heads if ".q_proj." in name else self.cfg.num_kv_heads
            return unpermute_qk(rows, heads)
        return rows

    def get(self, name: str) -> torch.Tensor:
        from quant_kernels.gguf_ref import dequantize

        info = self.gf.tensors[self._gguf_name[name]]
        w = dequantize(self.raw(name), info.ggml_type, self.shape(name))
        return self.unpermute(name, w)

    def write_side_files(self, out: str) -> None:
        from quantrt.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf_metadata(self.gf.metadata, self.path)
        tok._backend.save(os.path.join(out, "tokenizer.json"))
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": self.cfg.max_position_embeddings}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if tok._special_tokens.get(key):
                tc[key] = tok._special_tokens[key]
        if tok.chat_template:
            tc["chat_template"] = tok.chat_template
        with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tc, f, indent=2, ensure_ascii=False)


def _hf_config(cfg: Any, tied: bool) -> dict[str, Any]:
    cls, model_type = GGUF_ARCHS[cfg.architecture]
    out = {"architectures": [cls], "model_type": model_type,
           "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
           "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
           "rope_theta": cfg.rope.theta, "max_position_embeddings": cfg.max_position_embeddings,
           "tie_word_embeddings": tied, "hidden_act": cfg.hidden_act,
           "attention_bias": cfg.attention_bias, "torch_dtype": "float16"}
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        out["eos_token_id"] = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 \
            else list(cfg.eos_token_ids)
    if model_type in ("mistral", "qwen2") and cfg.sliding_window:
        out["sliding_window"] = cfg.sliding_window
    return out


def open_source(source: str | os.PathLike) -> ConvertSource:
    """Resolve ``source`` like ``quantrt run`` does (path, 'demo', hub id) and open it."""
    from quantrt.quant.detect import detect_hf, read_json
    from quantrt.sources import resolve_source

    src = resolve_source(os.fspath(source))
    path = str(src.path)
    if src.kind == "gguf":
        return GGUFSource(path)
    if not os.path.isdir(path):
        raise SourceError("not a model directory or .gguf file", where=path)
    raw = read_json(os.path.join(path, "config.json"))
    detected = detect_hf(path, raw)
    if detected.method != "none":
        from quantrt.convert.source_quantized import QuantizedHFSource

        return QuantizedHFSource(path, raw, detected)
    return HFSource(path, raw)
