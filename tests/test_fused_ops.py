"""quant_kernels.fused_ops against the torch ops the model uses without them.

CPU: the kernels run under TRITON_INTERPRET=1.  Tolerances: the kernels compute in fp32 and
round once, the torch chains round after each op in the activation dtype, so results
differ by a few units in the last place: max |diff| <= 2 ulp of the output scale
(fp16: 2e-3 relative, bf16: 1.6e-2).  Cache slots not addressed by the step must stay
untouched (poisoned with NaN).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from quant_kernels import fused_ops  # noqa: E402
from quantrt.config import RopeConfig  # noqa: E402
from quantrt.models.attention import write_kv  # noqa: E402
from quantrt.models.layers import RotaryEmbedding  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def close(got, ref, dtype):
    scale = ref.float().abs().max().clamp_min(1e-6)
    return ((got.float() - ref.float()).abs().max() / scale).item() <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,hq,hk,d,rot", [(1, 4, 2, 64, 64), (5, 3, 1, 80, 80),
                                           (17, 8, 8, 32, 16), (3, 6, 2, 96, 64)])
def test_rope_write_kv_matches_torch(dtype, t, hq, hk, d, rot):
    rotary = RotaryEmbedding(RopeConfig(theta=500000.0), d, rot, 256).to(DEV)
    pos = torch.randint(0, 256, (t,), device=DEV)
    cos, sin = rotary.tables(pos, dtype)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV, dtype=dtype)
    blocks, bs = 4, 8
    slots = torch.randperm(blocks * bs, device=DEV)[:t]
    kc = torch.full((blocks, bs, hk, d), float("nan"), device=DEV, dtype=dtype)
    vc = kc.clone()
    q = fused_ops.rope_write_kv(qkv, cos, sin, kc, vc, slots, hq, hk, d)
    # the torch path of Attention.forward
    x = qkv.view(t, hq + 2 * hk, d)
    qk = rotary.apply(x[:, :hq + hk], cos, sin)
    kr = torch.full_like(kc, float("nan"))
    vr = kr.clone()
    write_kv(kr, vr, qk[:, hq:], x[:, hq + hk:], slots)
    assert close(q, qk[:, :hq], dtype)
    written = torch.zeros(blocks * bs, dtype=torch.bool, device=DEV)
    written[slots] = True
    flat_k, flat_kr = kc.view(-1, hk, d), kr.view(-1, hk, d)
    assert close(flat_k[written], flat_kr[written], dtype)
    assert torch.equal(vc.view(-1, hk, d)[written], vr.view(-1, hk, d)[written])
    assert torch.isnan(flat_k[~written]).all() and torch.isnan(vc.view(-1, hk, d)[~written]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,n", [(1, 1), (3, 17), (5, 1376), (2, 3000)])
def test_silu_mul_matches_torch(dtype, t, n):
    x = torch.randn(t, 2 * n, device=DEV, dtype=dtype) * 3
    gate, up = x.chunk(2, dim=-1)
    assert close(fused_ops.silu_mul(x), torch.nn.functional.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,n", [(1, 8), (3, 23), (7, 576), (2, 4096)])
def test_add_rms_norm_matches_torch(dtype, t, n):
    h = torch.randn(t, n, device=DEV, dtype=dtype)
    delta = torch.randn(t, n, device=DEV, dtype=dtype)
    w = torch.rand(n, device=DEV, dtype=dtype) + 0.5
    hs, normed = fused_ops.add_rms_norm(h, delta, w, 1e-5)
    ref = h + delta
    if dtype == torch.float16 or DEV == "cuda":
        assert torch.equal(hs, ref)
    else:  # the interpreter's fp32 -> bf16 cast truncates instead of rounding
        assert close(hs, ref, dtype)
    assert close(normed, torch.nn.functional.rms_norm(ref, (n,), w, 1e-5), dtype)


def test_bad_input_is_refused():
    x = torch.randn(2, 7, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"\[T, 2n\]"):
        fused_ops.silu_mul(x)
    with pytest.raises(ValueError, match="alike"):
        fused_ops.add_rms_norm(x, x[:1], torch.ones(7, device=DEV, dtype=x.dtype), 1e-5)
    qkv = torch.randn(2, 10, device=DEV, dtype=torch.float16)
    kc = torch.zeros(1, 4, 1, 4, device=DEV, dtype=torch.float16)
    cos = torch.ones(2, 1, 4, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="qkv must be"):
        fused_ops.rope_write_kv(qkv, cos, cos, kc, kc.clone(), torch.zeros(2, dtype=torch.long,
                                                                           device=DEV), 1, 1, 4)


def test_model_uses_fused_ops_only_on_cuda():
    assert not fused_ops.usable(torch.zeros(1))


def test_fused_residual_path_matches_plain(tmp_path, monkeypatch):
    """The GPU model path that hands each layer's residual add to the next norm's kernel
    (``DecoderLayer.forward_fused``), run here with the kernels interpreted, gives the
    plain path's logits for a prefill and the decode steps after it."""
    from quantrt.engine.sequence import SamplingParams
    from tests.tiny_models import engine, make_tiny_model, prompt

    path = make_tiny_model(tmp_path / "m", "llama", seed=4)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5)
    plain = engine(path).generate([prompt(13, seed=2)], sp)[0]
    calls = []
    real = fused_ops.add_rms_norm
    monkeypatch.setattr(fused_ops, "usable", lambda x: True)
    monkeypatch.setattr(fused_ops, "add_rms_norm",
                        lambda *a: calls.append(1) or real(*a))
    fused = engine(path).generate([prompt(13, seed=2)], sp)[0]
    assert fused.output_ids == plain.output_ids
    for a, b in zip(fused.logprobs, plain.logprobs):
        assert abs(a.logprob - b.logprob) < 1e-3
    layers = 2
    assert len(calls) >= 6 * 2 * layers  # two per layer per step, plus the final norm
