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
from tests.tiny_models import make_tiny_model

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


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
@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("case", READ_CASES.values(), ids=READ_CASES.keys())
def test_triton_interpreted(case, dtype):
    _triton_check(case, dtype, torch.float32, "cpu", 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("case", READ_CASES.values(), ids=READ_CASES.keys())
def test_triton_gpu(case, dtype, q_dtype):
    # q rounded to 16 bits and 16-bit dots; outputs ~N(0, 3^2)
    _triton_check(case, dtype, q_dtype, "cuda", 5e-2 if q_dtype == torch.float16 else 1e-1)


def test_kernels_refuse_other_cache_dtypes():
    from quant_kernels.paged_attention import check_cache_dtype

    q = torch.zeros(1, 2, 16)
    check_cache_dtype(q, torch.zeros(1, dtype=torch.float8_e5m2),
                      torch.zeros(1, dtype=torch.float8_e5m2))
    with pytest.raises(ValueError, match="must be of q's dtype or one FP8 dtype"):
        check_cache_dtype(q, torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float16))
    with pytest.raises(ValueError, match="must be of q's dtype or one FP8 dtype"):
        check_cache_dtype(q, torch.zeros(1, dtype=torch.float8_e4m3fn),
                          torch.zeros(1, dtype=torch.float8_e5m2))
