"""Random-init tiny HF checkpoints (odd sizes) with a byte-level tokenizer, for tests; the
same weights as integer-quantized checkpoints (GPTQ / AWQ packing of round-to-nearest
weights); and transformers models holding exactly the weights a quantized checkpoint
dequantizes to (the reference our logits are compared with)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

VOCAB = 300  # 256 byte tokens + specials + padding rows, deliberately not a power of two

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # sliding windows shorter than the test prompts, so that they cross the boundary
    "mistral-swa": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    # head_dim != hidden / heads, 2 sliding layers then a global one with its own rope base,
    # a query scale that is not head_dim's
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 32, "num_hidden_layers": 3, "sliding_window": 6, "sliding_window_pattern": 3,
        "query_pre_attn_scalar": 20, "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}}),
    # soft-caps small enough to bend these tiny models' scores and logits
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 32, "num_hidden_layers": 3, "sliding_window": 6,
        "query_pre_attn_scalar": 20, "attn_logit_softcapping": 0.05,
        "final_logit_softcapping": 1.0}),
    # longrope past position 64 (factors for head_dim 18: see longrope()), a sliding window
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {
        "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 9,
        "original_max_position_embeddings": 64, "pad_token_id": None}),
}


def longrope(head_dim: int) -> dict:
    """Phi-3 rope_scaling with distinct short and long factors for ``head_dim``."""
    n = head_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.5 + 0.4 * i for i in range(n)]}


def save_byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    fast.save_pretrained(path)


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(seed)
    kwargs = {"vocab_size": VOCAB, "hidden_size": 72, "intermediate_size": 136, "num_hidden_layers": 2,
                  "num_attention_heads": 3, "num_key_value_heads": 1, "max_position_embeddings": 256,
                  "rms_norm_eps": 1e-6, "bos_token_id": 256, "eos_token_id": 257}
    kwargs.update(extra)
    kwargs.update(overrides)
    if arch == "phi3" and "rope_scaling" not in kwargs:
        kwargs["rope_scaling"] = longrope(kwargs["hidden_size"] // kwargs["num_attention_heads"])
    config = getattr(transformers, cfg_name)(**kwargs)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: make them informative
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    save_byte_tokenizer(path)
    return path


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def save_bpe_tokenizer(path: Path, add_bos: bool = False) -> None:
    """Byte-level BPE (<s>=256, </s>=257) with a few merges (a gpt2 GGUF vocabulary needs
    some) and fewer ids than VOCAB; ``add_bos``: encoding prepends <s>, as Gemma's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "qkv_proj", "gate_up_proj")


def write_int_checkpoint(src: Path, dst: Path, method: str, bits: int = 4,
                         group_size: int = 32) -> dict[str, torch.Tensor]:
    """``src``'s linear layers round-to-nearest quantized and packed the way AutoGPTQ
    (``gptq``: symmetric, v1 zeros) or AutoAWQ (``awq``: GEMM layout, zero points) store
    them, everything else copied; returns the HF state dict those packed tensors dequantize
    to (fp16 scales included)."""
    from safetensors.torch import load_file, save_file

    from formats import awq, gptq
    from quant_kernels.int_ref import rtn_quantize

    dst.mkdir(parents=True, exist_ok=True)
    state = {}
    for part in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(part)))
    out, dequant = {}, {}
    for name, t in state.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.rpartition(".")[2] in LINEARS):
            out[name] = dequant[name] = t
            continue
        w = t.float()
        if method == "gptq":
            q, s, z = rtn_quantize(w, bits, group_size, sym=True)
            qw, qz, sc, gi = gptq.pack(q, z, s, None, bits, 1, group_size=group_size)
            out.update({f"{module}.qweight": qw, f"{module}.qzeros": qz,
                        f"{module}.scales": sc, f"{module}.g_idx": gi})
            dequant[name] = gptq.dequantize(qw, qz, sc, gi, bits, group_size, 1, dtype=torch.float32)
        else:
            q, s, z = rtn_quantize(w, bits, group_size, sym=False)
            qw, qz, sc = awq.pack(q, z, s, bits, group_size, "gemm")
            out.update({f"{module}.qweight": qw, f"{module}.qzeros": qz, f"{module}.scales": sc})
            dequant[name] = awq.dequantize(qw, qz, sc, bits, group_size, "gemm", dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    cfg = read_config(src)
    cfg["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
         "sym": True, "checkpoint_format": "gptq"} if method == "gptq" else
        {"quant_method": "awq", "bits": bits, "group_size": group_size, "version": "gemm",
         "zero_point": True})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, dst / f.name)
    return dequant


def hf_model(model_dir: Path, state: dict[str, torch.Tensor] | None = None):
    """transformers' model of ``model_dir`` (fp32), holding ``state`` when given (an
    absent lm_head.weight is the tied embedding)."""
    import transformers

    if state is None:
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {k: v.float() for k, v in state.items()}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model


def hf_state_from_gguf(model_dir: Path, gguf_path: Path) -> dict[str, torch.Tensor]:
    """The HF state dict a GGUF written by tests/gguf_writer.py holds, dequantized by
    gguf-py: names mapped back, Llama's Q/K permutation and Gemma's norm +1 undone, rows the
    converter dropped from Gemma 3's embedding filled with zeros (compare logits only over
    the GGUF's vocabulary)."""
    import gguf
    import transformers

    from tests.gguf_writer import GEMMA_ARCHS, NORM_SHIFT, PERMUTED_ARCHS

    config = read_config(model_dir)
    skeleton = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(model_dir))
    modules = sorted({k.rpartition(".")[0] for k in skeleton.state_dict()})
    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields["general.architecture"]
    arch_name = bytes(field.parts[field.data[0]]).decode()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    state = {}
    for t in reader.tensors:
        if t.name.startswith(("rope_factors", "rope_freqs")):
            continue
        base, _, suffix = t.name.rpartition(".")
        hf = next(h for h in modules if names.get_name(h) == base)
        data = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                         dtype=np.float32))
        data = data.reshape(tuple(reversed([int(d) for d in t.shape])))
        if arch in PERMUTED_ARCHS and hf.endswith(("q_proj", "k_proj")):
            h = heads if hf.endswith("q_proj") else kv_heads
            data = data.reshape(h, -1, 2, *data.shape[1:]).transpose(1, 2).reshape(data.shape)
        if arch in GEMMA_ARCHS and hf.endswith("norm"):
            data = data - NORM_SHIFT
        if hf == "model.embed_tokens" and data.shape[0] < config["vocab_size"]:
            data = torch.cat([data, data.new_zeros(config["vocab_size"] - data.shape[0], data.shape[1])])
        state[f"{hf}.{suffix}"] = data
    return state


# -- engines over tiny models ----------------------------------------------------------------
def small_engine(loaded, **kw):
    """An engine over a loaded model with a 4 MiB KV cache of 4-token blocks, so that a few
    short prompts already straddle blocks and fill the cache (``kw``: EngineConfig fields,
    which may override both)."""
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine

    kw.setdefault("kv_cache_memory", 4 << 20)
    kw.setdefault("block_size", 4)
    return LLMEngine(loaded, EngineConfig(**kw))


# -- comparing our engine with transformers ---------------------------------------------------
def engine(source, **load_kw):
    """An engine over ``source`` on the CPU with 4-token KV blocks (so windows and chunks
    straddle block boundaries)."""
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.loader import load

    return LLMEngine(load(source, device="cpu", progress=False, **load_kw),
                     EngineConfig(kv_cache_memory=8 << 20, block_size=4))


def prompt(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1000 + 7 * length + seed)
    return torch.randint(0, 256, (length,), generator=g).tolist()


def our_logits(eng, ids: list[int]) -> torch.Tensor:
    return eng.runner.logits_for(ids, eng.blocks)


def hf_logits(hf, ids: list[int], vocab: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, :, :vocab].float()


def our_greedy(eng, ids: list[int], n: int) -> list[int]:
    from quantrt.engine.sequence import SamplingParams

    seq = eng.generate([ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
    return list(seq.output_ids)


def hf_greedy(hf, ids: list[int], n: int, vocab: int | None = None) -> list[int]:
    """Argmax decoding that recomputes the whole sequence each step (no KV cache)."""
    ids, out = list(ids), []
    for _ in range(n):
        nxt = int(hf_logits(hf, ids, vocab)[-1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def hf_cached_greedy(hf, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their logprobs decoding with its KV cache: a cached key
    keeps the rotation it was written with (longrope's switch, as our engine does), where a
    whole-sequence recompute would rotate every key with the long factors."""
    past, step, tokens, logprobs = None, torch.tensor([ids]), [], []
    with torch.no_grad():
        for _ in range(n):
            out = hf(step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = out.logits[0, -1].float().log_softmax(-1)
            tokens.append(int(logp.argmax()))
            logprobs.append(float(logp[tokens[-1]]))
            step = torch.tensor([[tokens[-1]]])
    return tokens, logprobs


QUANT_FORMATS = ("Q8_0", "Q4_0", "gptq", "awq")


def quantized(model_dir: Path, fmt: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """``model_dir`` as a GGUF of type ``fmt`` (written like llama.cpp's converter) or as a
    4-bit GPTQ / AWQ checkpoint dir (group 32); returns its path and the HF state dict it
    dequantizes to."""
    from tests.gguf_writer import convert_hf_to_gguf

    if fmt in ("gptq", "awq"):
        out = model_dir.parent / f"{model_dir.name}-{fmt}"
        return out, write_int_checkpoint(model_dir, out, fmt)
    out = convert_hf_to_gguf(model_dir, model_dir / f"tiny-{fmt}.gguf", fmt)
    return out, hf_state_from_gguf(model_dir, out)


def check_cuda_engine(path: Path, hf, lengths: tuple[int, ...], tol: float = 1e-3) -> None:
    """GPU tests: fp32 on CUDA (decode steps through the Triton kernel and CUDA graphs) gives
    transformers' greedy tokens, and per-token logprobs within ``tol`` of transformers' on
    the same tokens."""
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.engine.sequence import SamplingParams
    from quantrt.loader import load

    eng = LLMEngine(load(path, device="cuda", dtype="float32", progress=False),
                    EngineConfig(kv_cache_memory=64 << 20, block_size=16))
    assert eng.runner.graphs is not None
    prompts = [prompt(n, seed=6) for n in lengths]
    seqs = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                logprobs=0))
    for ids, seq in zip(prompts, seqs):
        want, ref = hf_cached_greedy(hf, ids, 12)
        assert list(seq.output_ids) == want
        ours = torch.tensor([lp.logprob for lp in seq.logprobs])
        assert (ours - torch.tensor(ref)).abs().max().item() < tol
