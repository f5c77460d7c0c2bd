"""GGUF files converted from our tiny HF checkpoints, the way llama.cpp's convert_hf_to_gguf.py
writes them (tests/gguf_writer.py), loaded by quantrt and compared with two references.

For every architecture (llama, llama-tied, qwen2, qwen3, mistral):

1. F32 GGUF against the original safetensors directory, both loaded by quantrt: full-prompt
   logits agree to 1e-5 absolute.  Tensor names, the Q/K row permutation (llama/mistral),
   hyper-parameter metadata and embedding tying all have to be right for that.
2. Q8_0 and Q4_0 GGUFs (plus Q4_1 for qwen2, and F16/Q5_0 for llama) against transformers
   loading the *same* GGUF (``from_pretrained(dir, gguf_file=...)``, which dequantizes with
   gguf-py): with ``kernels="reference"`` (exact dequantize + fp32 GEMM) logits agree to 1e-3
   and greedy 12-token continuations are identical; with the default kernels (CPU: the
   cpu-ggml extension, int8 activations per block of 32 against the GGML blocks) logits
   agree to ``DEFAULT_KERNEL_TOL`` (activation rounding, <= 2^-8 of each block's max per value).

   transformers cannot load the qwen3 GGUF: its GGUF config mapping for qwen3 ignores
   ``qwen3.attention.key_length``, so Qwen3Config keeps its default head_dim=128 and every
   attention weight mismatches (our qwen3 uses head_dim 32 != hidden/heads = 24 on purpose).
   For qwen3 the reference is therefore the HF model built from the original config.json with
   the GGUF's gguf-py-dequantized tensors loaded into it (names mapped back, Q/K permutation
   undone where there is one) -- ``hf_from_gguf_dequantized``.  That reconstruction is itself
   checked against transformers' own GGUF loading on llama (permuted) and qwen2 (biases).
   (Mistral: llama.cpp writes Mistral as arch ``llama``, so transformers loads it as a
   LlamaForCausalLM; with sliding_window=None that is the same network.)
3. ``inspect_report.build_report`` names the architecture, the tensor-type counts, the file
   type, tied embeddings and the kernel actually used.
"""
from __future__ import annotations

import collections
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from tests.gguf_writer import HF_TO_GGUF_ARCH, convert_hf_to_gguf, permute_qk
from tests.tiny_models import make_tiny_model, read_config

Q = gguf.GGMLQuantizationType
ARCHS = ["llama", "llama-tied", "qwen2", "qwen3", "mistral"]
# Every GEMM K (hidden 96, intermediate 160, q size heads*head_dim) a multiple of 32.
SIZES = dict(hidden_size=96, intermediate_size=160)
OVERRIDES = {"qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)}
SEEDS = {"llama": 11, "llama-tied": 12, "qwen2": 13, "qwen3": 14, "mistral": 15}
QTYPES = {arch: ["Q8_0", "Q4_0"] for arch in ARCHS}
QTYPES["qwen2"] += ["Q4_1"]
QTYPES["llama"] += ["F16", "Q5_0"]
# transformers 5.x cannot load these archs' GGUF (see the module docstring); should a later
# version load them, its own loading is used instead of the reconstruction.
HF_GGUF_UNSUPPORTED = {"qwen3"}
# <= 32 rows, so the default CPU kernel stays on its int4 path; position 0 has an identity
# rotation, so only the longer prompt can see a wrong Q/K permutation.
PROMPT_LENGTHS = [1, 23]
GREEDY_TOKENS = 12
REF_TOL = 1e-3
# The CPU default (cpu-ggml) rounds activations to int8 per block of 32, as llama.cpp does:
# measured max |diff| <= 1.1e-2 over all cases here (the older tinygemm path, bf16
# activations: 5.6e-3), on logits of magnitude <= 1.8 (the reference path agrees to ~4e-7).
DEFAULT_KERNEL_TOL = 2e-2


# -- fixtures ------------------------------------------------------------------------------
def save_bpe_tokenizer(path: Path) -> None:
    """Our byte-level test tokenizer (<s>=256, </s>=257) plus a few BPE merges: a gpt2 GGUF
    vocabulary must carry merges (llama.cpp and transformers refuse one without), and the
    ids the tokenizer lacks (265..299) exercise the [PAD{i}] rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"),
              ("Ġa", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


_BUILT: dict[str, SimpleNamespace] = {}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    """One tiny checkpoint per arch and its GGUFs, built once per module: the tests that
    parametrize ``tiny`` indirectly (with a qtype) get new fixture instances, so the
    checkpoints themselves are cached here."""
    arch = request.param
    if arch not in _BUILT:
        path = make_tiny_model(tmp_path_factory.mktemp(arch), arch, seed=SEEDS[arch],
                               **SIZES, **OVERRIDES.get(arch, {}))
        save_bpe_tokenizer(path)
        ggufs = {qt: convert_hf_to_gguf(path, path / f"tiny-{qt}.gguf", qt)
                 for qt in ["F32", *QTYPES[arch]]}
        _BUILT[arch] = SimpleNamespace(arch=arch, path=path, gguf=ggufs, cfg=read_config(path))
    return _BUILT[arch]


def _engine(source, **kw):
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.loader import load

    return LLMEngine(load(source, device="cpu", **kw),
                     EngineConfig(kv_cache_memory=8 << 20, block_size=4))


def _ids(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1000 + 7 * length + seed)
    return torch.randint(0, 256, (length,), generator=g).tolist()


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of gguf_writer.permute_qk, written independently of quantrt's loader."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_from_gguf_dequantized(model_dir: Path, gguf_path: Path):
    """The HF model of ``model_dir``'s config.json holding the GGUF's tensors, dequantized by
    gguf-py, mapped back to HF names and un-permuted: the reference where transformers cannot
    read the GGUF itself."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields["general.architecture"]
    arch_name = bytes(field.parts[field.data[0]]).decode()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    state = {}
    for hf_name, param in model.state_dict().items():
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname not in tensors and hf_name == "lm_head.weight":
            gname = "token_embd.weight"  # tied: llama.cpp omits output.weight
        t = tensors[gname]
        data = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                         dtype=np.float32)).reshape(param.shape)
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = unpermute_rows(data, heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = unpermute_rows(data, kv_heads)
        state[hf_name] = data
    model.load_state_dict(state, strict=True)
    return model


_HF_CACHE: dict[tuple[str, str], object] = {}


def _hf_reference(tiny, qt: str):
    """transformers' model for ``tiny.gguf[qt]`` (cached for the module)."""
    key = (str(tiny.path), qt)
    if key not in _HF_CACHE:
        import transformers

        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                tiny.path, gguf_file=tiny.gguf[qt].name, dtype=torch.float32).eval()
        except RuntimeError:  # qwen3: size mismatch from the ignored key_length
            if tiny.arch not in HF_GGUF_UNSUPPORTED:
                raise
            hf = hf_from_gguf_dequantized(tiny.path, tiny.gguf[qt])
        _HF_CACHE[key] = hf
    return _HF_CACHE[key]


@pytest.fixture(scope="module", autouse=True)
def _module_setup():
    """One intra-op thread: these models are tiny, and on 2 shared cores torch's spinning
    worker threads made the module ~3x slower under load.  Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _HF_CACHE.clear()
    _BUILT.clear()


# -- the writer itself -----------------------------------------------------------------------
def test_permutation_is_what_the_loader_undoes():
    from quantrt.loader import unpermute_qk

    for heads, rows, cols in [(3, 96, 5), (2, 64, 1), (4, 128, 7)]:
        w = torch.randn(rows, cols)
        p = permute_qk(w, heads)
        assert not torch.equal(p, w)
        assert torch.equal(unpermute_qk(p, heads), w)
        assert torch.equal(unpermute_rows(p, heads), w)
        b = torch.randn(rows)  # biases permute the same way
        assert torch.equal(unpermute_qk(permute_qk(b, heads), heads), b)
    # head 0 of a 2-head, head_dim 4 weight: rows [0 1 | 2 3] -> [0 2 1 3]
    assert permute_qk(torch.arange(8.0), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gguf_metadata_and_tensors(tiny):
    from formats.gguf_file import read_gguf

    cfg = tiny.cfg
    gf = read_gguf(tiny.gguf["Q8_0"])
    meta = gf.metadata
    arch = gguf.MODEL_ARCH_NAMES[HF_TO_GGUF_ARCH[cfg["architectures"][0]]]
    assert meta["general.architecture"] == arch
    assert arch == {"mistral": "llama", "llama-tied": "llama"}.get(tiny.arch, tiny.arch)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    want = {"block_count": 2, "embedding_length": 96, "feed_forward_length": 160,
            "attention.head_count": heads,
            "attention.head_count_kv": cfg["num_key_value_heads"],
            "context_length": cfg["max_position_embeddings"],
            "rope.dimension_count": head_dim}
    for key, value in want.items():
        assert meta[f"{arch}.{key}"] == value, key
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(10000.0)
    if tiny.arch == "qwen3":
        assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == 32
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert meta["tokenizer.ggml.bos_token_id"] == 256 and meta["tokenizer.ggml.eos_token_id"] == 257
    assert ("output.weight" in gf.tensors) == (tiny.arch != "llama-tied")
    types = {n: Q(t.ggml_type) for n, t in gf.tensors.items()}
    assert types["token_embd.weight"] == Q.Q8_0 and types["blk.1.ffn_down.weight"] == Q.Q8_0
    assert types["output_norm.weight"] == Q.F32 and types["blk.0.attn_norm.weight"] == Q.F32
    if tiny.arch == "qwen2":
        assert types["blk.0.attn_q.bias"] == Q.F32
    if tiny.arch == "qwen3":
        assert types["blk.0.attn_q_norm.weight"] == Q.F32


def test_gguf_tokenizer_matches_hf_directory(tiny):
    from quantrt.loader import load

    ours, ref = load(tiny.gguf["F32"], device="cpu").tokenizer, load(tiny.path, device="cpu").tokenizer
    for text in ["in the winter an answer", "hé 日本 <s>x</s>", " the  the\nthe", ""]:
        assert ours.encode(text) == ref.encode(text), text
        ids = ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
    assert (ours.bos_token_id, ours.eos_token_id) == (256, 257)
    assert ours.chat_template and "assistant" in ours.chat_template


# -- 1. F32 GGUF == safetensors --------------------------------------------------------------
@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_f32_gguf_logits_match_safetensors(tiny, length):
    gguf_eng, st_eng = _engine(tiny.gguf["F32"]), _engine(tiny.path)
    assert gguf_eng.lm.config.tie_word_embeddings == (tiny.arch == "llama-tied")
    ids = _ids(length)
    a = gguf_eng.runner.logits_for(ids, gguf_eng.blocks)
    b = st_eng.runner.logits_for(ids, st_eng.blocks)
    assert a.shape == b.shape == (length, tiny.cfg["vocab_size"])
    assert (a - b).abs().max().item() < 1e-5


# -- 2. quantized GGUF == transformers on the same GGUF ---------------------------------------
QT_CASES = [pytest.param(arch, qt, id=f"{arch}-{qt}") for arch in ARCHS for qt in QTYPES[arch]]


@pytest.mark.parametrize("tiny,qtype", QT_CASES, indirect=["tiny"])
def test_quantized_reference_kernels_match_transformers(tiny, qtype):
    eng = _engine(tiny.gguf[qtype], kernels="reference")
    hf = _hf_reference(tiny, qtype)
    for length in PROMPT_LENGTHS:
        ids = _ids(length, seed=1)
        ours = eng.runner.logits_for(ids, eng.blocks)
        ref = _hf_logits(hf, ids)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < REF_TOL, length
    from quantrt.engine.sequence import SamplingParams

    prompt = _ids(9, seed=2)
    seq = eng.generate([prompt], SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0,
                                                ignore_eos=True))[0]
    assert seq.output_ids == _hf_greedy(hf, prompt, GREEDY_TOKENS)


@pytest.mark.parametrize("tiny,qtype", QT_CASES, indirect=["tiny"])
def test_quantized_default_kernels_close_to_transformers(tiny, qtype):
    eng = _engine(tiny.gguf[qtype])
    hf = _hf_reference(tiny, qtype)
    for length in PROMPT_LENGTHS:
        ids = _ids(length, seed=3)
        ours = eng.runner.logits_for(ids, eng.blocks)
        ref = _hf_logits(hf, ids)
        assert (ours - ref).abs().max().item() < DEFAULT_KERNEL_TOL, length


@pytest.mark.parametrize("tiny,qtype", [pytest.param("llama", "Q4_0", id="llama"),
                                        pytest.param("qwen2", "Q4_1", id="qwen2")],
                         indirect=["tiny"])
def test_dequantized_reconstruction_matches_transformers_gguf_loading(tiny, qtype):
    """The qwen3 reference (hf_from_gguf_dequantized) agrees with transformers' own GGUF
    loader where that works: llama (permuted Q/K) and qwen2 (q/k/v biases)."""
    import transformers

    ours = hf_from_gguf_dequantized(tiny.path, tiny.gguf[qtype])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tiny.path, gguf_file=tiny.gguf[qtype].name, dtype=torch.float32).eval()
    ids = _ids(23, seed=4)
    assert (_hf_logits(ours, ids) - _hf_logits(theirs, ids)).abs().max().item() < 1e-5


# -- 3. inspect ------------------------------------------------------------------------------
@pytest.mark.parametrize("tiny,qtype", [pytest.param(a, qt, id=f"{a}-{qt}")
                                        for a in ARCHS for qt in ("F32", "Q4_0")],
                         indirect=["tiny"])
def test_inspect_report(tiny, qtype):
    from quantrt.inspect_report import build_report, format_report
    from quantrt.loader import load

    lm = load(tiny.gguf[qtype], device="cpu")
    report = build_report(lm)
    tied = tiny.arch == "llama-tied"
    arch = "qwen2" if tiny.arch == "qwen2" else "qwen3" if tiny.arch == "qwen3" else "llama"
    layers = tiny.cfg["num_hidden_layers"]
    n_2d = 2 + 7 * layers - tied             # token_embd, output, q k v o gate up down
    n_f32 = 1 + 2 * layers                   # output_norm, attn_norm, ffn_norm
    n_f32 += 3 * layers * (tiny.arch == "qwen2")   # q/k/v biases
    n_f32 += 2 * layers * (tiny.arch == "qwen3")   # q/k norms
    want = collections.Counter({qtype: n_2d})
    want["F32"] += n_f32
    assert report["format"] == "gguf"
    assert report["config"]["architecture"] == arch
    assert report["config"]["tie_word_embeddings"] is tied
    assert report["config"]["head_dim"] == 32  # qwen3: from key_length, not hidden/heads (24)
    assert report["tensor_types"] == dict(want)
    assert report["quantization"]["method"] == "gguf"
    assert report["quantization"]["file_type"] == gguf.LlamaFileType[
        "ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}"].name.removeprefix("MOSTLY_")
    assert report["layers"]["self_attn.qkv_proj"]["weight_format"] == qtype
    assert report["layers"]["self_attn.qkv_proj"]["count"] == layers
    kernel = report["layers"]["mlp.down_proj"]["kernel"]
    cpu_fast = kernel.startswith(("cpu-ggml", "cpu-int4pack"))
    assert cpu_fast == (qtype != "F32"), kernel
    if tied:  # lm_head shares the embedding's packed tensor, counted once
        assert report["layers"]["lm_head"]["weight_format"] == qtype
    text = format_report(report)
    assert f"tied embeddings {'yes' if tied else 'no'}" in text
    assert "tensor types  " + ", ".join(f"{k} x{v}" for k, v in want.most_common()) in text


# -- a file declaring an architecture llama.cpp never writes ---------------------------------
def test_gguf_declaring_mistral_arch_loads_or_fails_cleanly(tmp_path):
    """llama.cpp writes Mistral as arch 'llama'; a file that says 'mistral' (with llama tensor
    names) must either load like llama or be refused with a QuantrtError, never a KeyError."""
    from quantrt.errors import QuantrtError
    from quantrt.loader import load

    path = make_tiny_model(tmp_path / "m", "mistral", seed=15, **SIZES)
    save_bpe_tokenizer(path)
    g = convert_hf_to_gguf(path, tmp_path / "m.gguf", "F32", arch_name="mistral")
    try:
        eng = _engine(g)
    except QuantrtError:
        return
    st = _engine(path)
    ids = _ids(17)
    a = eng.runner.logits_for(ids, eng.blocks)
    b = st.runner.logits_for(ids, st.blocks)
    assert (a - b).abs().max().item() < 1e-5


# -- Llama 3.1 rope scaling stored as rope_freqs.weight --------------------------------------
def test_llama3_rope_freqs_tensor_matches_config_scaling(tmp_path):
    """llama.cpp writes Llama 3.1 rope scaling as per-frequency divisors in
    ``rope_freqs.weight`` (no scaling keys); loading it must give the same logits as the
    safetensors checkpoint whose config carries rope_type llama3 (positions past the
    original context, where the scaling matters)."""
    path = make_tiny_model(tmp_path / "l3", "llama3-rope", seed=11, **SIZES)
    save_bpe_tokenizer(path)
    gguf_path = convert_hf_to_gguf(path, path / "tiny-F32.gguf", "F32")
    reader = gguf.GGUFReader(str(gguf_path))
    assert any(t.name == "rope_freqs.weight" for t in reader.tensors)
    gguf_eng, st_eng = _engine(gguf_path), _engine(path)
    ids = _ids(150)
    a = gguf_eng.runner.logits_for(ids, gguf_eng.blocks)
    b = st_eng.runner.logits_for(ids, st_eng.blocks)
    assert (a - b).abs().max().item() < 1e-4
