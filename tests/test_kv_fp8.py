"""FP8 KV cache (``EngineConfig.kv_cache_dtype``): the clamped write, every attention path's
read (torch reference, the CPU fallback, the Triton decode and prefill kernels interpreted
on the CPU and on the GPU), and the engine: batched == alone, no leaks, twice the tokens of
a 16-bit cache per byte, and greedy outputs close to the full-precision cache's."""
from __future__ import annotations

import os

import pytest
import torch

from quantrt.engine.sequence import SamplingParams
from quantrt.errors import ConfigError
from quantrt.models.attention import (AttentionMetadata, paged_attention, paged_attention_ref,
                                      to_cache_dtype, write_kv)
from tests.tiny_models import make_tiny_model, small_engine

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
OTHER = FP8 + [torch.float16]   # any cache dtype other than q's is cast tile by tile


# -- names and config -------------------------------------------------------------------------
def test_names_are_the_estimators():
    from quantrt.engine.kv_dtype import TORCH_KV_DTYPES
    from quantrt.estimate.memory import KV_CACHE_DTYPES

    assert set(TORCH_KV_DTYPES) | {"auto"} == set(KV_CACHE_DTYPES)
    for name, dt in TORCH_KV_DTYPES.items():   # the estimator's byte count is the cache's
        assert KV_CACHE_DTYPES[name] == dt.itemsize


@pytest.mark.parametrize("bad", ["int8", "fp4", "FP8", "", None, 8])
def test_bad_kv_cache_dtype(bad):
    from quantrt.engine.llm_engine import EngineConfig

    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, bfloat16"):
        EngineConfig(kv_cache_dtype=bad)
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig.from_options(kv_cache_dtype=bad)


def test_torch_dtypes():
    from quantrt.engine.kv_dtype import kv_cache_torch_dtype

    assert kv_cache_torch_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.float16) is torch.float8_e4m3fn
    assert kv_cache_torch_dtype("fp8_e4m3", torch.float32) is torch.float8_e4m3fn
    assert kv_cache_torch_dtype("fp8_e5m2", torch.float32) is torch.float8_e5m2
    assert kv_cache_torch_dtype("float16", torch.float32) is torch.float16


# -- write ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("tokens", [1, 17, 23])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16], ids=str)
def test_write_kv_is_the_clamped_cast(dtype, tokens, src):
    g = torch.Generator().manual_seed(tokens)
    big = torch.finfo(dtype).max
    nb, bs, h, d = 9, 4, 2, 24
    k = (torch.randn(tokens, h, d, generator=g) * 40).to(src)
    v = (torch.randn(tokens, h, d, generator=g) * 40).to(src)
    k[0, 0, 0], v[0, 1, 3] = 3 * big, -5 * big      # beyond the format: clamped, not inf/NaN
    k_cache = torch.zeros(nb, bs, h, d, dtype=dtype)
    v_cache = torch.zeros(nb, bs, h, d, dtype=dtype)
    slots = torch.randperm(nb * bs, generator=g)[:tokens]
    write_kv(k_cache, v_cache, k, v, slots)
    got_k = k_cache.view(-1, h, d)[slots].float()
    got_v = v_cache.view(-1, h, d)[slots].float()
    assert torch.equal(got_k, k.float().clamp(-big, big).to(dtype).float())
    assert torch.equal(got_v, v.float().clamp(-big, big).to(dtype).float())
    assert got_k[0, 0, 0].item() == big and got_v[0, 1, 3].item() == -big
    assert torch.isfinite(k_cache.float()).all() and torch.isfinite(v_cache.float()).all()
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.view(-1, h, d)[untouched].float().any()


def test_e4m3_above_448_is_448():
    x = torch.tensor([448.0, 449.0, 500.0, -1000.0, 1e6])
    assert to_cache_dtype(x, torch.float8_e4m3fn).float().tolist() == [448, 448, 448, -448, 448]


def test_cast_to_16_bit_cache_is_plain():
    x = torch.randn(17, 3) * 1e5
    assert torch.equal(to_cache_dtype(x, torch.float16), x.to(torch.float16))


# -- read -------------------------------------------------------------------------------------
def _fp8_batch(ctx, qlens, heads, kv_heads, head_dim, block_size, cache_dtype, q_dtype, seed=0):
    """fp8 caches of random K/V (scaled past e4m3's range now and then), packed q, metadata;
    and the upcast caches (the reference's input)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in ctx]
    nb = sum(need) + 2
    order = torch.randperm(nb, generator=g).tolist()
    width = max(need)
    tables = []
    for n in need:
        own, order = order[:n], order[n:]
        tables.append(own + [0] * (width - n))
    shape = (nb, block_size, kv_heads, head_dim)
    k = to_cache_dtype(torch.randn(shape, generator=g) * 3, cache_dtype)
    v = to_cache_dtype(torch.randn(shape, generator=g) * 3, cache_dtype)
    q = torch.randn(sum(qlens), heads, head_dim, generator=g).to(q_dtype)
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    i32 = dict(dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(qlens), dtype=torch.int64),
        block_tables=torch.tensor(tables, **i32), context_lens=torch.tensor(ctx, **i32),
        query_start_loc=torch.tensor(starts, **i32), context_lens_host=list(ctx),
        query_lens_host=list(qlens))
    return q, k, v, meta


READ_CASES = {  # ctx lens, query lens, heads, kv heads, head dim, block size
    "decode": ([1, 17, 23], [1, 1, 1], 4, 2, 32, 4),
    "prefill": ([17, 23], [17, 23], 3, 1, 16, 16),
    "mixed-cached-prefix": ([40, 9, 23], [17, 1, 5], 6, 2, 24, 8),
}


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("case", READ_CASES.values(), ids=READ_CASES.keys())
def test_reference_reads_the_upcast_cache(case, dtype):
    q, k, v, meta = _fp8_batch(*case, dtype, torch.float32)
    scale = case[4] ** -0.5
    want = paged_attention_ref(q, k.float(), v.float(), meta, scale)
    assert torch.equal(paged_attention_ref(q, k, v, meta, scale), want)
    # the CPU dispatch (extension or not) takes the reference for an fp8 cache
    assert torch.equal(paged_attention(q, k, v, meta, scale), want)
    assert torch.isfinite(want).all()


def _triton_check(case, cache_dtype, q_dtype, device, tol):
    from quantrt.models.attention import paged_attention_triton

    q, k, v, meta = _fp8_batch(*case, cache_dtype, q_dtype)
    scale = case[4] ** -0.5
    want = paged_attention_ref(q.float(), k.float(), v.float(), meta, scale)
    dev = AttentionMetadata(
        slot_mapping=meta.slot_mapping.to(device), block_tables=meta.block_tables.to(device),
        context_lens=meta.context_lens.to(device),
        query_start_loc=meta.query_start_loc.to(device),
        context_lens_host=meta.context_lens_host, query_lens_host=meta.query_lens_host)
    got = paged_attention_triton(q.to(device), k.to(device), v.to(device), dev, scale)
    assert got.dtype == q_dtype
    err = (got.float().cpu() - want).abs().max().item()   # NaN fails too
    assert err < tol, f"max abs error {err}"


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", OTHER, ids=str)
@pytest.mark.parametrize("case", READ_CASES.values(), ids=READ_CASES.keys())
def test_triton_interpreted(case, dtype):
    _triton_check(case, dtype, torch.float32, "cpu", 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", OTHER, ids=str)
@pytest.mark.parametrize("case", READ_CASES.values(), ids=READ_CASES.keys())
def test_triton_gpu(case, dtype, q_dtype):
    # q rounded to 16 bits and 16-bit dots; outputs ~N(0, 3^2)
    _triton_check(case, dtype, q_dtype, "cuda", 5e-2 if q_dtype == torch.float16 else 1e-1)


def test_kernels_refuse_other_cache_dtypes():
    from quant_kernels.paged_attention import check_cache_dtype

    q = torch.zeros(1, 2, 16)
    for dt in (torch.float8_e5m2, torch.bfloat16):
        check_cache_dtype(q, torch.zeros(1, dtype=dt), torch.zeros(1, dtype=dt))
    with pytest.raises(ValueError, match="must be one of float32, float16"):
        check_cache_dtype(q, torch.zeros(1, dtype=torch.int8), torch.zeros(1, dtype=torch.int8))
    with pytest.raises(ValueError, match="must be one of float32, float16"):
        check_cache_dtype(q, torch.zeros(1, dtype=torch.float8_e4m3fn),
                          torch.zeros(1, dtype=torch.float8_e5m2))


# -- engine -----------------------------------------------------------------------------------
def _engine(loaded, kv_cache_dtype, **kw):
    return small_engine(loaded, kv_cache_dtype=kv_cache_dtype, **kw)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(1, 30, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_engine_fp8_batched_equals_alone(loaded, overlap):
    prompts = _prompts(16)
    alone = [_engine(loaded, "fp8", overlap_steps=overlap).generate([p], GREEDY)[0].output_ids
             for p in prompts]
    # a small token budget mixes chunked prefills with decodes in one step
    eng = _engine(loaded, "fp8", overlap_steps=overlap, max_num_batched_tokens=40)
    assert all(k.dtype == torch.float8_e4m3fn and v.dtype == torch.float8_e4m3fn
               for k, v in eng.runner.kv_caches)
    assert [s.output_ids for s in eng.generate(prompts, GREEDY)] == alone
    assert eng.blocks.num_free == eng.blocks.num_blocks and not any(eng.blocks.refcount)
    assert not eng.requests and not eng.streams


def test_fp8_cache_holds_more_tokens(loaded):
    from quantrt.engine.model_runner import kv_bytes_per_token

    cfg = loaded.config
    elements = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    assert kv_bytes_per_token(loaded, torch.float8_e4m3fn) == elements
    budget = elements * 4 * 103   # bytes of 103 fp32 tokens
    blocks = {name: _engine(loaded, name, kv_cache_memory=budget).blocks.num_blocks
              for name in ("auto", "bfloat16", "fp8", "fp8_e5m2")}
    assert blocks == {"auto": 103 // 4, "bfloat16": 206 // 4, "fp8": 412 // 4,
                      "fp8_e5m2": 412 // 4}


# Measured on this tiny random model (flat logits: std 0.17, so greedy ties are close):
# e4m3 15/16 first tokens and 164/192 tokens equal to the fp32 cache's, logits within
# 0.015; e5m2 (2 mantissa bits) 13/16, 118/192, 0.030; a bf16 cache 16/16, 192/192, 0.0007.
@pytest.mark.parametrize("name, first_min, logit_tol", [("fp8", 13, 0.05),
                                                        ("fp8_e5m2", 11, 0.1)])
def test_fp8_outputs_close_to_full_precision(loaded, name, first_min, logit_tol):
    prompts = _prompts(16)
    full = _engine(loaded, "auto")
    fp8 = _engine(loaded, name)
    want = [s.output_ids for s in full.generate(prompts, GREEDY)]
    got = [s.output_ids for s in fp8.generate(prompts, GREEDY)]
    first = sum(a[0] == b[0] for a, b in zip(want, got))
    assert first >= first_min, f"{first}/16 first tokens agree"
    for p in prompts[:4]:
        diff = (full.runner.logits_for(p, full.blocks)
                - fp8.runner.logits_for(p, fp8.blocks)).abs().max().item()
        assert diff < logit_tol, f"logits differ by {diff}"


def test_llm_takes_the_option(loaded):
    from quantrt import LLM

    llm = LLM(loaded, kv_cache_dtype="fp8_e5m2", kv_cache_memory=1 << 20)
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e5m2
    out = llm.generate([[5, 17, 99]], GREEDY)[0].outputs[0]
    assert len(out.token_ids) == 12
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        LLM(loaded, kv_cache_dtype="e4m3")


def test_cli_passes_the_option(loaded, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import quantrt.engine.llm_engine as llm_engine
    import quantrt.server.launch as launch
    from quantrt.cli import main

    seen = {}
    real = llm_engine.LLMEngine

    def engine(lm, config, executor=None):
        seen["run"] = config.kv_cache_dtype
        return real(lm, config, executor)

    def build_engine(*args, **kw):
        seen["serve"] = kw["kv_cache_dtype"]
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(llm_engine, "LLMEngine", engine)
    monkeypatch.setattr(launch, "build_engine", build_engine)
    model = make_tiny_model(tmp_path / "m", "llama")
    cli = CliRunner()
    res = cli.invoke(main, ["run", str(model), "-p", "hi", "-n", "3", "-t", "0", "--device", "cpu",
                            "--kv-cache-dtype", "fp8"])
    assert res.exit_code == 0 and seen["run"] == "fp8", res.output
    res = cli.invoke(main, ["serve", str(model), "--kv-cache-dtype", "fp8_e5m2"])
    assert seen["serve"] == "fp8_e5m2" and "stopped by the test" in res.output + res.stderr
    res = cli.invoke(main, ["run", str(model), "-p", "hi", "--kv-cache-dtype", "int8"])
    assert res.exit_code == 2 and "'int8' is not one of" in res.output + res.stderr


@pytest.mark.gpu
def test_engine_gpu_graphs_fp8(tmp_path):
    """CUDA graphs on, Triton decode and prefill over an fp8 cache: the graph replays give
    the eager steps' tokens, blocks all free after, and most first tokens match the fp32
    cache's."""
    from quantrt import LLM

    source = make_tiny_model(tmp_path / "m", seed=3)
    prompts = [[5, 17, 99, 3], list(range(40, 63)), [200], list(range(1, 18)), [7] * 9]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    runs = {}
    for name, graphs in (("fp8", True), ("fp8", False), ("auto", True)):
        llm = LLM(str(source), device="cuda", dtype="float32", cuda_graphs=graphs,
                  max_num_seqs=8, block_size=4, kv_cache_dtype=name)
        assert (llm.engine.runner.graphs is not None) == graphs
        runs[name, graphs] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    assert runs["fp8", True] == runs["fp8", False]
    first = sum(a[0] == b[0] for a, b in zip(runs["fp8", True], runs["auto", True]))
    assert first >= 3, f"{first}/5 first tokens agree with the fp32 cache"
