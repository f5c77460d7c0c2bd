"""Write a random-init Llama checkpoint at a real model's shape, unquantized (bf16) or AWQ
4-bit (GEMM layout, round-to-nearest, group 128), for benchmarks on hosts without a model hub.

    python scripts/make_random_checkpoint.py --shape llama-3.2-1b --format awq --out DIR
    python scripts/make_random_checkpoint.py --shape llama-3-8b --format bf16 --out DIR

Weights ~ N(0, 0.02) (norms 1), generated and quantized on the GPU when there is one.
The tokenizer has one word per id ("w17"), so every generated token has text.  Shapes are the published configs of the named models.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from formats import awq  # noqa: E402
from quant_kernels.int_ref import rtn_quantize  # noqa: E402

LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         rope_theta=500000.0, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0, tie_word_embeddings=False,
                       max_position_embeddings=8192),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                        rope_theta=500000.0, tie_word_embeddings=False,
                        max_position_embeddings=8192),
}
FORMATS = ("bf16", "awq")
GROUP = 128


def hf_config(shape: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "bos_token_id": 256, "eos_token_id": 257,
            "torch_dtype": "bfloat16", "attention_bias": False, **SHAPES[shape]}


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i)}


def make(shape: str, fmt: str, out: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    cfg = hf_config(shape)
    out.mkdir(parents=True, exist_ok=True)

    def rand(*size):
        return (torch.randn(*size, generator=gen, device=dev) * 0.02).to(torch.bfloat16)

    tensors: dict[str, torch.Tensor] = {}
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    tensors["model.embed_tokens.weight"] = rand(vocab, h)
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(vocab, h)
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=dev)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16, device=dev)
        for name, (n, k) in linear_shapes(cfg).items():
            w = rand(n, k)
            if fmt == "bf16":
                tensors[f"{p}.{name}.weight"] = w
                continue
            q, scales, zeros = rtn_quantize(w.float(), 4, GROUP, sym=False)
            qweight, qzeros, s = awq.pack(q, zeros, scales, 4, GROUP, "gemm")
            tensors.update({f"{p}.{name}.qweight": qweight, f"{p}.{name}.qzeros": qzeros,
                            f"{p}.{name}.scales": s})
    if fmt == "awq":
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                      "zero_point": True, "version": "gemm",
                                      "modules_to_not_convert": None}
        cfg["torch_dtype"] = "float16"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_word_tokenizer(out, cfg["vocab_size"])
    return out


def save_word_tokenizer(out: Path, vocab: int) -> None:
    """One word per id ("w0" .. "wN"), so every generated token has text: a server
    benchmark's time to first token and time per token then mean what they say (with a
    byte-level vocabulary, random ids past 257 decode to nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {0: "<unk>", 256: "<s>", 257: "</s>"}
    words = {special.get(i, f"w{i}"): i for i in range(vocab)}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out)
    add_chat_template(out)


# A plain role-tagged template, so chat endpoints (quantrt serve, bench_serve.py) work on
# these checkpoints; the byte-level vocabulary makes any template tokenizable.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def add_chat_template(out: Path) -> None:
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--format", choices=FORMATS, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print(make(args.shape, args.format, args.out))


if __name__ == "__main__":
    main()
