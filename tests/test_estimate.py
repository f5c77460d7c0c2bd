"""quantrt estimate: weight bytes exact against real checkpoints (every golden fixture, GGUF
headers, published checkpoint sizes), big-model numbers against parameter-count arithmetic,
tensor-parallel sharding, KV cache and fit arithmetic, sources that never read weights, and
the CLI's one-line errors."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from formats.gguf_file import read_gguf
from quantrt.cli import main
from quantrt.errors import ConfigError, QuantrtError, SourceError
from quantrt.estimate import Overheads, compare, estimate, parse_method, weight_bytes
from quantrt.estimate.arch import arch_from_hf, weights
from quantrt.estimate.gguf_mix import mixed_type
from quantrt.estimate.layouts import Context, RepackedToWQ, nbytes, words
from quantrt.estimate.memory import BLOCK_SIZE
from quantrt.estimate.packed_int import awq_gemv_zeros_width
from tests.fixture_util import FIXTURES, fixture_dirs
from tests.gguf_writer import convert_hf_to_gguf
from tests.test_gguf_models import save_bpe_tokenizer
from tests.tiny_models import make_tiny_model

CONFIGS = Path(__file__).parent / "estimate_configs"
BIG = ("llama-2-70b", "llama-3-70b", "mixtral-8x7b", "qwen2.5-72b")
GB = 1e9


def big(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


# -- exactness against real checkpoint layouts ------------------------------------------------
def safetensors_bytes(path: Path) -> dict[str, int]:
    """{tensor name: data bytes} from a safetensors header (the data is never read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0]
            for k, v in header.items() if k != "__metadata__"}


def checkpoint_tensor_bytes(d: Path) -> dict[str, int]:
    if (d / "qmodel.pt").exists():  # HQQ's own format: {module: {W_q, scale, zero, ...}}
        sd = torch.load(d / "qmodel.pt", weights_only=True)
        return {f"{m}.{k}": v.numel() * v.element_size() for m, layer in sd.items()
                for k, v in layer.items() if isinstance(v, torch.Tensor)}
    out: dict[str, int] = {}
    for f in sorted(d.glob("*.safetensors")):
        if f.name != "reference.safetensors":
            out.update(safetensors_bytes(f))
    return out


# Metadata tensors the loaders parse and drop (compressed-tensors' weight_shape,
# bitsandbytes' quant_state JSON and weight_format).
DROPPED = (".weight_shape", ".weight_format")


def wq_packed_bytes(layout, arch) -> int:
    """GPU bytes of every quantized linear as quantrt's own packer lays it out."""
    from quant_kernels.wq_layout import pack_wq

    total = 0
    for w in weights(arch):
        if not (w.is_linear and layout.quantizes(w)):
            continue
        bits, group, act_order = layout.wq_settings(w, w.shape[1])
        (n, k), g = w.shape, (group if 0 < group < w.shape[1] else w.shape[1])
        if g not in (32, 64, 128, 256, k):     # the reference path keeps it as stored
            total += sum(t.loaded_bytes for t in layout.quantized(w, n, k, k, Context(arch)))
            continue
        gn = -(-k // g)
        wq = pack_wq(torch.zeros(n, k, dtype=torch.int32), torch.ones(n, gn), torch.zeros(n, gn),
                     g, 4 if bits <= 4 else 8, torch.arange(k) if act_order else None)
        total += sum(t.numel() * t.element_size() for t in (wq.qweight, wq.scales, wq.bias, wq.perm)
                     if t is not None)
    return total


@pytest.mark.parametrize("d", fixture_dirs(""), ids=lambda d: d.name)
def test_fixture_weight_bytes_equal_checkpoint_tensors(d):
    actual = checkpoint_tensor_bytes(d)
    est = estimate(d, ["checkpoint"], compute_dtype="float16")
    row, layout = est.rows[0], parse_or_checkpoint(d)
    # bitsandbytes double quant writes its offset's float repr into the quant_state blob:
    # 18-20 characters where the estimate assumes 19, so +-1 byte per quantized layer.
    slack = sum(1 for k in actual if "quant_state" in k) if "bnb_nf4_dq" in d.name else 0
    assert abs(row.checkpoint_bytes - sum(actual.values())) <= slack, d.name
    # In GPU memory: integer formats in quantrt's WQ layout, the rest as stored less the
    # metadata the loaders drop (the fixtures' unquantized tensors are fp16 = compute dtype).
    quantized = {w.name for w in weights(est.arch) if w.is_linear and layout.quantizes(w)}
    plain = sum(v for k, v in actual.items() if k.rsplit(".", 1)[0] not in quantized)
    first = _weight(est.arch, min(quantized))
    if isinstance(layout, RepackedToWQ) and layout.wq_settings(first, first.shape[1]):
        expected = plain + wq_packed_bytes(layout, est.arch)
    else:
        expected = sum(v for k, v in actual.items()
                       if not k.endswith(DROPPED) and ".quant_state." not in k)
    assert row.loaded_bytes == expected, d.name


def parse_or_checkpoint(d: Path):
    from quantrt.estimate.source import read_source

    return read_source(d).layout


def test_fixture_exactness_is_not_vacuous():
    """A layout that is off by a little must be noticed: GEMM's bytes for a GEMV file."""
    d = FIXTURES / "awq_gemv_g64"
    gemv = estimate(d, ["checkpoint"]).rows[0].checkpoint_bytes
    gemm = estimate(d, ["awq:group_size=64,version=gemm"]).rows[0].checkpoint_bytes
    assert gemv == sum(checkpoint_tensor_bytes(d).values()) != gemm


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [1, 31, 32, 33, 64, 96, 336, 352, 4096])
def test_word_counts_match_formats_packing(bits, count):
    from formats.packing import packed_length

    assert words(count, bits) == packed_length(count, bits, dense=True)


@pytest.mark.parametrize("k", [64, 128, 320, 4096, 14336])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_awq_gemv_width_matches_formats_awq(k, group):
    from formats.awq import calculate_zeros_width

    assert awq_gemv_zeros_width(k, group) == calculate_zeros_width(k, group)


# -- GGUF: header exactness and llama.cpp's mix -----------------------------------------------
@pytest.mark.parametrize("arch,qtype", [("llama", "Q8_0"), ("llama-tied", "Q8_0"),
                                        ("qwen2", "Q8_0"), ("qwen3", "F16"), ("llama", "Q4_0")])
def test_gguf_estimate_equals_header(tmp_path, arch, qtype):
    model = make_tiny_model(tmp_path / "hf", arch, hidden_size=64, intermediate_size=96,
                            num_attention_heads=4, num_key_value_heads=2)
    save_bpe_tokenizer(model)   # a gpt2 GGUF vocabulary needs merges
    (tmp_path / "gguf").mkdir()
    path = convert_hf_to_gguf(model, tmp_path / "gguf" / "m.gguf", qtype)
    tensors = read_gguf(path).tensors
    header = sum(t.nbytes for t in tensors.values())
    # on the GPU the linear layers' blocks are repacked for the fused kernels (Q8_0: 36 bytes
    # per 32 values instead of 34, Q4_0: 20 instead of 18); embeddings and norms stay as stored
    loaded = sum(nbytes(f"cuda:{t.type_name}", math.prod(t.shape)) if _linear(name)
                 else t.nbytes for name, t in tensors.items())
    for source in (path, path.parent):            # the file, or a directory holding it
        row = estimate(source).rows[0]
        assert row.checkpoint_bytes == header
        assert row.loaded_bytes == loaded
        assert (loaded > header) == (qtype != "F16")


def _linear(gguf_name: str) -> bool:
    return gguf_name.endswith(".weight") and (
        gguf_name == "output.weight" or any(f".{p}" in gguf_name for p in (
            "attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")))


def test_demo_gguf_estimate_equals_header(demo_gguf):
    header = sum(t.nbytes for t in read_gguf(demo_gguf).tensors.values())
    est = estimate(demo_gguf)
    assert est.arch.tied and est.rows[0].name == "checkpoint"
    assert est.rows[0].checkpoint_bytes == header


def _weight(arch, name):
    return next(w for w in weights(arch) if w.name == name)


@pytest.mark.parametrize("model,name,expected", [
    ("llama-3-70b", "lm_head", "Q6_K"),
    ("llama-3-70b", "model.embed_tokens", "Q4_K"),
    ("llama-3-70b", "model.layers.0.self_attn.v_proj", "Q6_K"),    # use_more_bits: i < n/8
    ("llama-3-70b", "model.layers.10.self_attn.v_proj", "Q5_K"),   # Q4_K, bumped for 70B
    ("llama-3-70b", "model.layers.12.mlp.down_proj", "Q6_K"),      # (12 - 10) % 3 == 2
    ("llama-3-70b", "model.layers.13.mlp.down_proj", "Q4_K"),
    ("llama-3-70b", "model.layers.13.self_attn.q_proj", "Q4_K"),
    ("llama-3-70b", "model.norm", "F32"),
    ("mixtral-8x7b", "model.layers.5.self_attn.k_proj", "Q8_0"),    # 8 experts
    ("mixtral-8x7b", "model.layers.5.self_attn.v_proj", "Q8_0"),
    ("mixtral-8x7b", "model.layers.5.self_attn.o_proj", "Q5_K"),
    ("mixtral-8x7b", "model.layers.5.block_sparse_moe.gate", "F32"),
    ("qwen2.5-72b", "model.layers.0.mlp.down_proj", "Q8_0"),       # K = 29568: Q6_K -> Q8_0
    ("qwen2.5-72b", "model.layers.13.mlp.down_proj", "Q5_0"),      # Q4_K -> Q5_0
])
def test_q4_k_m_mix_follows_llama_cpp(model, name, expected):
    arch = arch_from_hf(big(model))
    assert mixed_type("Q4_K_M", _weight(arch, name), Context(arch)) == expected


# Sizes in the model cards of TheBloke/Llama-2-70B-GGUF, -GPTQ and Llama-2-7B-GGUF, -GPTQ
# (GB, two decimals; the files add < 2 MB of headers and tokenizer metadata).  Those GPTQ
# files come from AutoGPTQ, which writes a zero fp16 bias for every quantized linear.
Z = ",zero_bias=true"
PUBLISHED = [
    ("llama-2-70b", "q4_0", 38.87), ("llama-2-70b", "q4_k_m", 41.42),
    ("llama-2-70b", "q5_k_m", 48.75), ("llama-2-70b", "q6_k", 56.59),
    ("llama-2-70b", "q8_0", 73.29),
    ("llama-2-70b", "gptq:bits=4,group_size=-1,desc_act=true" + Z, 35.33),
    ("llama-2-70b", "gptq:bits=4,group_size=128,desc_act=true" + Z, 36.65),
    ("llama-2-70b", "gptq:bits=4,group_size=32,desc_act=true" + Z, 40.66),
    ("llama-2-70b", "gptq:bits=3,group_size=-1,desc_act=true" + Z, 26.77),
    ("llama-2-70b", "gptq:bits=3,group_size=128,desc_act=true" + Z, 28.03),
    ("llama-2-7b", "q4_k_m", 4.08), ("llama-2-7b", "q3_k_m", 3.30), ("llama-2-7b", "q5_k_m", 4.78),
    ("llama-2-7b", "gptq:bits=4,group_size=128" + Z, 3.90),
]


@pytest.mark.parametrize("model,method,gb", PUBLISHED)
def test_published_checkpoint_sizes(model, method, gb):
    cfg = big("llama-2-70b")
    if model == "llama-2-7b":
        cfg.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32)
    assert abs(weight_bytes(cfg, method).checkpoint / GB - gb) <= 0.01


# -- big models against parameter-count arithmetic --------------------------------------------
PUBLISHED_PARAMETERS = {"llama-2-70b": 68_976_648_192, "llama-3-70b": 70_553_706_496,
                        "mixtral-8x7b": 46_702_792_704, "qwen2.5-72b": 72_706_203_648}


def param_counts(cfg: dict) -> tuple[int, int]:
    """(parameters of the quantizable linears, all parameters) by hand."""
    h, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["hidden_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    experts = cfg.get("num_local_experts", 1)
    linear = n * (2 * h * q + 2 * h * kv + 3 * h * f * experts)
    bias = (q + 2 * kv) if "Qwen2" in cfg["architectures"][0] else 0
    router = experts * h if experts > 1 else 0
    rest = n * (2 * h + bias + router) + h + 2 * cfg["vocab_size"] * h
    return linear, linear + rest


@pytest.mark.parametrize("model", BIG)
def test_parameter_counts_are_the_published_ones(model):
    linear, total = param_counts(big(model))
    assert total == PUBLISHED_PARAMETERS[model] == arch_from_hf(big(model)).parameters()
    assert weight_bytes(big(model), "bf16").checkpoint == 2 * total


# Bits per quantized weight from each method's definition (weights + scales + zeros per group).
BITS = {"bf16": 16, "fp8": 8, "int8": 8, "w8a8-int8": 8, "gptq-8bit": 8 + 24 / 128,
        "awq": 4 + 20 / 128, "gptq-4bit": 4 + 20 / 128, "w4a16": 4 + 16 / 128,
        "nf4": 4 + 8 / 64, "fp4": 4 + 32 / 64, "hqq-4bit": 4 + 32 / 64,
        "gptq-3bit": 3 + 19 / 128, "gptq-2bit": 2 + 18 / 128}


@pytest.mark.parametrize("method", sorted(BITS))
@pytest.mark.parametrize("model", BIG)
def test_big_models_within_2_percent_of_parameter_arithmetic(model, method):
    linear, total = param_counts(big(model))
    expected = linear * BITS[method] / 8 + (total - linear) * 2
    got = weight_bytes(big(model), method).checkpoint
    assert abs(got / expected - 1) < 0.02, (got, expected)


@pytest.mark.parametrize("model", BIG)
def test_q8_0_within_2_percent_of_parameter_arithmetic(model):
    linear, total = param_counts(big(model))
    h, n = big(model)["hidden_size"], big(model)["num_hidden_layers"]
    norms = (2 * n + 1) * h
    expected = (total - norms) * 34 / 32 + norms * 4        # 34-byte blocks of 32; F32 norms
    got = weight_bytes(big(model), "q8_0").checkpoint
    assert abs(got / expected - 1) < 0.02, (got, expected)


# -- tensor parallelism -----------------------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_tensor_parallel_bf16_shards(tp):
    cfg = big("llama-3-70b")
    h, f, v, n = 8192, 28672, 128256, 80
    kv_heads = max(1, 8 // tp)                     # 16 GPUs: each keeps a KV head replica
    per_layer = (h * h // tp) * 2 + 2 * (kv_heads * 128 * h) + 3 * h * f // tp + 2 * h
    expected = 2 * (n * per_layer + h + 2 * (-(-v // tp)) * h)
    assert weight_bytes(cfg, "bf16", num_gpus=tp).per_gpu == expected


def test_tensor_parallel_splits_unevenly_at_groups():
    """Qwen2.5-72B: intermediate 29568 / 4 = 7392 is not a multiple of 128 (vLLM refuses
    AWQ/GPTQ with TP 4).  quantrt's loader cuts between groups instead: 231 groups as
    58/58/58/57, so the largest rank holds 7424 columns of down_proj and rows of gate/up;
    the estimate counts that rank's bytes."""
    est = estimate(CONFIGS / "qwen2.5-72b.json", ["awq", "nf4"], gpu="H100",
                   num_gpus=4, max_model_len=8192)
    awq, nf4 = est.rows
    assert awq.fits and awq.reason == "" and nf4.fits
    cfg = json.loads((CONFIGS / "qwen2.5-72b.json").read_text())
    even = weight_bytes(cfg, "awq", num_gpus=4).per_gpu
    one = weight_bytes(cfg, "awq").loaded
    assert one / 4 < even < one / 4 * 1.01   # a few more groups on the largest rank


@pytest.mark.parametrize("tp", [3, 5, 6])
def test_uneven_gpu_counts_split_heads_unevenly(tp):
    """64 heads over 3 GPUs: 22/21/21 (8 KV heads: 3/3/2); the largest rank counts."""
    est = estimate(CONFIGS / "llama-3-70b.json", ["awq"], num_gpus=tp)
    assert est.kv_bytes_per_token == 2 * 80 * -(-8 // tp) * 128 * 2


def test_more_gpus_than_heads_is_refused():
    with pytest.raises(ConfigError, match="cannot be split over 128 GPUs"):
        estimate(CONFIGS / "llama-3-70b.json", ["awq"], num_gpus=128)


# -- KV cache and fit -------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype,size", [("auto", 2), ("fp8", 1), ("float16", 2)])
@pytest.mark.parametrize("tp", [1, 4])
def test_kv_bytes_per_token(kv_dtype, size, tp):
    est = estimate(CONFIGS / "llama-3-70b.json", ["awq"], num_gpus=tp, kv_cache_dtype=kv_dtype)
    assert est.kv_bytes_per_token == 80 * 2 * (8 // tp) * 128 * size
    assert est.kv_bytes_per_sequence == est.kv_bytes_per_token * 8192


@pytest.mark.parametrize("window_layers,length", [(None, 32768), (2, 10000), (0, 1000)])
def test_sliding_window_layers_cap_kv(tmp_path, window_layers, length):
    """Qwen2 with sliding window on layers >= max_window_layers: each of those holds at most
    the window (4096), every other layer the whole sequence, in blocks of 16."""
    cfg = {**big("qwen2.5-72b"), "num_hidden_layers": 4, "use_sliding_window": True,
           "sliding_window": 4096, "max_window_layers": window_layers or 4,
           "max_position_embeddings": 32768}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    est = estimate(path, ["awq"], max_model_len=length)
    per_layer = 2 * 8 * 128 * 2
    sliding = 4 - (window_layers if window_layers is not None else 4)
    full_tokens = -(-length // BLOCK_SIZE) * BLOCK_SIZE
    swa_tokens = -(-min(length, 4096) // BLOCK_SIZE) * BLOCK_SIZE
    assert est.kv_bytes_per_sequence == per_layer * ((4 - sliding) * full_tokens
                                                     + sliding * swa_tokens)


def test_fit_arithmetic():
    over = Overheads(cuda_context=300 << 20, cuda_graphs=200 << 20, nccl=0)
    est = estimate(CONFIGS / "llama-3-70b.json", ["gptq-4bit"], gpu_memory_gib=64,
                   max_model_len=4096, max_num_seqs=8, overheads=over)
    r = est.rows[0]
    usable = int(64 * 2**30 * 0.9)
    assert r.overhead_bytes == 500 << 20
    assert r.kv_budget_bytes == usable - r.weights_per_gpu - r.activation_bytes - r.overhead_bytes
    assert r.kv_capacity_tokens == r.kv_budget_bytes // (est.kv_bytes_per_token * 16) * 16
    assert r.max_seqs == min(8, r.kv_budget_bytes // est.kv_bytes_per_sequence) == 8
    assert r.fits and r.kv_capacity_tokens > 4096
    longer = estimate(CONFIGS / "llama-3-70b.json", ["gptq-4bit"], gpu_memory_gib=64,
                      max_model_len=8192, max_num_seqs=1000, overheads=over).rows[0]
    assert longer.max_seqs == longer.kv_budget_bytes // (est.kv_bytes_per_sequence * 2)


@pytest.mark.parametrize("gpu,method,why", [
    ({"gpu": "A10G"}, "bf16", "weights alone"),
    ({"gpu": "T4", "num_gpus": 8}, "fp8", "compute capability"),
    ({"gpu_memory_gib": 43}, "gptq-4bit", "no room for one full-length sequence"),
])
def test_what_does_not_fit_says_why(gpu, method, why):
    r = estimate(CONFIGS / "llama-3-70b.json", [method], max_model_len=8192, **gpu).rows[0]
    assert r.fits is False and why in r.reason


def test_without_gpu_only_weights_and_kv_cost():
    est = estimate(CONFIGS / "mixtral-8x7b.json")
    assert [r.name for r in est.rows][:3] == ["bf16", "fp8", "int8"]
    assert all(r.fits is None and r.kv_capacity_tokens is None for r in est.rows)
    assert "--gpu" in est.table()


# -- sources: configs and headers, never weights ----------------------------------------------
def test_weights_are_never_read(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "gptq_v1_4bit_g32_sym", d)
    honest = estimate(d).rows[0]
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    assert estimate(d).rows[0] == honest
    assert estimate(d / "config.json").rows[0] == honest      # a bare config.json


@pytest.mark.parametrize("name,content,error,needle", [
    ("missing", None, SourceError, "no such file"),
    ("weights.bin", "x", SourceError, "not a config or GGUF file"),
    ("config.json", "[1]", QuantrtError, "JSON object"),
    ("config.json", '{"architectures": ["GemmaForCausalLM"]}', ConfigError, "supported:"),
    ("model.gguf", "GGUF", QuantrtError, "GGUF"),
])
def test_bad_sources(tmp_path, name, content, error, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=needle):
        estimate(path)


@pytest.mark.parametrize("kwargs,needle", [
    ({"gpu": "Z80"}, "unknown GPU"),
    ({"gpu_memory_gib": -4}, "positive"),
    ({"gpu": "A10G", "gpu_memory_gib": 24}, "not both"),
    ({"max_model_len": 10**6}, "exceeds"),
    ({"max_num_seqs": 0}, "positive"),
    ({"kv_cache_dtype": "int3"}, "kv_cache_dtype"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"methods": "gptq:bits=5"}, "bits"),
    ({"methods": "gptq:bitz=4"}, "unknown setting"),
    ({"methods": "awq:zero_point=maybe"}, "true or false"),
    ({"methods": "marlin-9000"}, "unknown quantization method"),
])
def test_bad_options(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        estimate(CONFIGS / "llama-3-70b.json", **kwargs)


@pytest.mark.parametrize("spec,label", [
    ("gptq:bits=3,group_size=64,desc_act=true", "GPTQ 3-bit g64 act-order"),
    ("awq:version=gemv", "AWQ 4-bit g128 gemv"),
    ("w4a16:group_size=32,symmetric=false", "compressed-tensors int4 g32 asym"),
    ("fp8:block=128x128", "FP8 e4m3 block 128x128"),
    ("gguf:ftype=q5_k_m", "GGUF Q5_K_M (llama.cpp mix)"),
    ("hqq:nbits=2,group_size=16", "HQQ 2-bit g16 axis 1"),
])
def test_method_specs(spec, label):
    assert parse_method(spec).layout.label == label


def test_gptq_dynamic_rules_skip_and_override():
    cfg = big("llama-2-70b")
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128,
          "dynamic": {"-:.*down_proj": {}, "+:.*q_proj": {"bits": 8}}}
    base = weight_bytes(cfg, {"quant_method": "gptq", "bits": 4, "group_size": 128}).checkpoint
    h, f, n = 8192, 28672, 80
    skipped = n * (h * f * 2 - (h * f // 2 + f // 128 * (h * 2 + h // 2) + f * 4))
    q8 = n * (h * h // 2 + h // 128 * h // 2)            # qweight and qzeros double
    assert weight_bytes(cfg, qc).checkpoint == base + skipped + q8


def test_compare_relative_errors():
    est = estimate(CONFIGS / "llama-3-70b.json", ["awq"])
    got = compare(est, {"loaded_bytes": est.rows[0].loaded_bytes * 1.1,
                        "kv_bytes_per_token": est.kv_bytes_per_token})
    assert got["loaded_bytes"]["relative_error"] == pytest.approx(1 / 1.1 - 1)
    assert got["kv_bytes_per_token"]["relative_error"] == 0
    with pytest.raises(ConfigError):
        compare(est, {"speed": 1})


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["awq_gemm_g64", "gptq_v1_4bit_g32_sym", "gptq_v1_3bit_g64",
                                  "gptq_v1_4bit_g128_asym_descact", "marlin_g128",
                                  "hqq_4bit_g64_axis1", "ct_w4a16_group"])
def test_gpu_loaded_bytes_are_the_estimate(name):
    """On a GPU quantrt repacks integer formats (WQ layout): the estimate's loaded bytes
    are what the loaded model holds.  (Activations are not compared here: the first CUDA
    forward of a process also allocates cuBLAS's workspace, and Triton may find its
    autotuning results in its disk cache.)"""
    from quantrt.estimate.validate import validate

    got = validate(FIXTURES / name, tokens=64)["comparison"]
    assert got["loaded_bytes"]["relative_error"] == 0


def test_validate_on_cpu_measures_what_it_estimates(tmp_path):
    from quantrt.estimate.validate import validate

    model = make_tiny_model(tmp_path / "m", "qwen2")
    got = validate(model, device="cpu")["comparison"]
    assert got["loaded_bytes"]["relative_error"] == 0
    assert got["kv_bytes_per_token"]["relative_error"] == 0


# -- command line -----------------------------------------------------------------------------
def test_cli_table_and_json():
    runner = CliRunner()
    args = ["estimate", str(CONFIGS / "llama-3-70b.json"), "-q", "awq,gptq:bits=3,group_size=64",
            "-q", "q4_k_m", "--gpu", "a10g", "--num-gpus", "4", "--max-model-len", "8192"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == ["awq", "gptq:bits=3,group_size=64", "q4_k_m"]
    assert all(r[-1] == "yes" for r in rows)
    data = json.loads(runner.invoke(main, [*args, "--json"]).stdout)
    assert [m["fits"] for m in data["methods"]] == [True, True, True]
    assert data["kv_bytes_per_token_per_gpu"] == 80 * 2 * 2 * 128 * 2


@pytest.mark.parametrize("args,needle", [
    (["--gpu", "Z80"], "unknown GPU"),
    (["--gpu-memory", "-3"], "positive"),
    (["--num-gpus", "128"], "cannot be split over 128 GPUs"),
    (["-q", "awq:group_size=banana"], "group_size"),
    (["--max-model-len", "100000000"], "exceeds"),
])
def test_cli_errors_are_one_line(args, needle):
    res = CliRunner().invoke(main, ["estimate", str(CONFIGS / "llama-3-70b.json"), *args])
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_cli_hub_id_offline_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "quantrt.cli", "estimate", "some-org/some-model"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: some-org/some-model: ")
    assert "offline" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
