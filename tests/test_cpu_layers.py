"""quant_kernels.cpu_layers (the extension's per-layer ops) against the torch code they replace.

Tolerances: every op is fp32 arithmetic on the same inputs, differing from torch only in
summation order and in exp (a degree-6 polynomial, relative error < 2e-7), so results
agree to 2e-6 relative to the values' scale; attention outputs (weighted means of V with
entries ~N(0, 1)) to 2e-5 absolute.  A wrong index, mask or head mapping is off by O(1).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant_kernels import cpu_ext, cpu_layers
from quantrt.models.attention import AttentionMetadata, paged_attention_ref

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason=f"CPU extension: {cpu_ext.status()[1]}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("t,h", [(1, 17), (23, 64), (5, 576)])
def test_rms_norm(t, h):
    x = torch.randn(t, h + 3, generator=_gen(h))[:, 1:h + 1] * 4  # strided rows
    w = torch.randn(h, generator=_gen(h + 1))
    assert cpu_layers.fits(x)
    got = cpu_layers.rms_norm(x, w, 1e-5)
    ref = F.rms_norm(x, (h,), w, 1e-5)
    assert torch.allclose(got, ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())


def _rope_ref(x, cos, sin):
    rot = cos.shape[-1]
    xr, rest = x[..., :rot], x[..., rot:]
    rotated = torch.cat((-xr[..., rot // 2:], xr[..., :rot // 2]), dim=-1)
    return torch.cat((xr * cos + rotated * sin, rest), dim=-1)


@pytest.mark.parametrize("t,heads,d,rot", [(1, 1, 64, 64), (17, 12, 64, 64), (3, 5, 40, 24),
                                           (23, 4, 18, 18)])
def test_rope(t, heads, d, rot):
    qkv = torch.randn(t, heads + 2, d, generator=_gen(t * d))
    x = qkv[:, :heads]  # a strided view, as the model passes it
    ang = torch.rand(t, 1, rot, generator=_gen(rot)) * 6
    got = cpu_layers.rope(x, ang.cos(), ang.sin())
    assert torch.allclose(got, _rope_ref(x, ang.cos(), ang.sin()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("t,i", [(1, 1), (17, 23), (4, 1536)])
def test_silu_mul(t, i):
    x = torch.randn(t, 2 * i, generator=_gen(i)) * 5
    x[0, 0] = -100.0  # exp underflow side
    got = cpu_layers.silu_mul(x)
    ref = F.silu(x[:, :i]) * x[:, i:]
    assert torch.allclose(got, ref, rtol=2e-6, atol=1e-7)


def test_write_kv():
    k_cache, v_cache = torch.randn(2, 5, 4, 3, 8).unbind(0)
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    kv = torch.randn(7, 2 * 3, 8, generator=_gen(1))
    k, v = kv[:, :3], kv[:, 3:]
    slots = torch.tensor([19, 0, 7, 3, 12, 4, 11])
    ek, ev = k_cache.clone(), v_cache.clone()
    ek.view(20, 3, 8)[slots] = k
    ev.view(20, 3, 8)[slots] = v
    cpu_layers.write_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, ek) and torch.equal(v_cache, ev)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_layers.write_kv(k_cache, v_cache, k[:1], v[:1], torch.tensor([20]))


def _batch(qlens, ctxs, heads, kv_heads, d, block_size=4, seed=0):
    """Random caches, shuffled block tables and metadata for sequences with these new-token
    counts and total lengths."""
    g = _gen(seed)
    need = [-(-c // block_size) for c in ctxs]
    nblocks = sum(need) + 3
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, start = [], 0
    for n in need:
        tables.append(perm[start:start + n])
        start += n
    width = max(need)
    k_cache = torch.randn(nblocks, block_size, kv_heads, d, generator=g)
    v_cache = torch.randn(nblocks, block_size, kv_heads, d, generator=g)
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        context_lens=torch.tensor(ctxs, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens_host=list(ctxs), query_lens_host=list(qlens))
    q = torch.randn(starts[-1], heads + 2 * kv_heads, d, generator=g)[:, :heads]
    return q, k_cache, v_cache, meta


CASES = [
    # (query lens, context lens, heads, kv heads, head dim, window, softcap)
    ([1], [1], 1, 1, 64, None, None),
    ([1, 1, 1], [17, 5, 23], 9, 3, 64, None, None),
    ([7], [7], 4, 2, 20, None, None),
    ([1, 5, 1, 3], [30, 5, 2, 11], 6, 2, 64, None, None),
    ([1, 6, 1], [40, 9, 17], 4, 1, 32, 8, None),
    ([2, 1], [9, 23], 4, 4, 16, None, 5.0),
]


@pytest.mark.parametrize("qlens,ctxs,heads,kv_heads,d,window,cap", CASES)
def test_paged_attention_matches_reference(qlens, ctxs, heads, kv_heads, d, window, cap):
    q, kc, vc, meta = _batch(qlens, ctxs, heads, kv_heads, d, seed=sum(ctxs))
    got = cpu_layers.paged_attention(q, kc, vc, meta, d ** -0.5 * 2, window, cap)
    ref = paged_attention_ref(q, kc, vc, meta, d ** -0.5 * 2, window, cap)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 2e-5


def test_paged_attention_rows_do_not_depend_on_the_batch():
    q, kc, vc, meta = _batch([1, 4, 1], [13, 4, 30], 6, 2, 64, seed=3)
    full = cpu_layers.paged_attention(q, kc, vc, meta, 0.125, None, None)
    sub = AttentionMetadata(
        slot_mapping=meta.slot_mapping[:1], block_tables=meta.block_tables[2:],
        context_lens=meta.context_lens[2:], query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        context_lens_host=[30], query_lens_host=[1])
    alone = cpu_layers.paged_attention(q[5:], kc, vc, sub, 0.125, None, None)
    assert torch.equal(alone, full[5:])


def test_paged_attention_bad_metadata():
    q, kc, vc, meta = _batch([1], [9], 2, 1, 8)
    meta.block_tables[0, 1] = 999
    with pytest.raises(RuntimeError, match="block id out of range"):
        cpu_layers.paged_attention(q, kc, vc, meta, 1.0, None, None)
