"""formats.fp8: per-tensor / per-shard / per-channel / block (partial edge blocks) FP8."""
import pytest
import torch

from formats import fp8
from quantrt.errors import FormatError

SHAPES = [(200, 1376), (23, 96), (128, 256), (1, 17)]


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_quantize_dequantize(strategy):
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=gen)
        q, s = fp8.quantize(w, strategy)
        assert q.dtype == torch.float8_e4m3fn and q.shape == (n, k)
        want = {"tensor": (1,), "channel": (n, 1),
                "block": (-(-n // 128), -(-k // 128))}[strategy]
        assert s.shape == want and s.dtype == torch.float32
        bs = (128, 128) if strategy == "block" else None
        back = fp8.dequantize(q, s, block_size=bs)
        full_s = fp8.expand_block_scale(s, (n, k), (128, 128)) if bs else s.reshape(-1, 1)
        assert torch.equal(back, q.float() * full_s)
        # e4m3 keeps 3 mantissa bits: relative error <= 2**-4, plus subnormal floor
        assert ((back - w).abs() <= w.abs() / 16 + full_s * 2 ** -9 + 1e-12).all()
        assert q.float().abs().max() <= fp8.E4M3_MAX


def test_block_scale_partial_edges():
    w = torch.zeros(130, 260)
    w[129, 259] = 448.0  # alone in the partial corner block
    w[0, 0] = 1.0
    q, s = fp8.quantize(w, "block")
    assert s.shape == (2, 3)
    assert s[1, 2] == 1.0 and s[0, 0] == 1.0 / 448
    full = fp8.expand_block_scale(s, (130, 260), (128, 128))
    assert full.shape == (130, 260) and full[129, 259] == 1.0 and full[127, 255] == s[0, 1]


def test_per_shard_scales_and_requantize():
    gen = torch.Generator().manual_seed(1)
    shards = [64, 16, 16]  # q/k/v fused rows
    parts = [torch.randn(r, 96, generator=gen) * m for r, m in zip(shards, (1.0, 3.0, 0.2))]
    qs, ss = zip(*(fp8.quantize(p, "tensor") for p in parts))
    weight, scales = torch.cat(qs), torch.cat(ss)
    deq = fp8.dequantize(weight, scales, shard_sizes=shards)
    assert torch.equal(deq, torch.cat([q.float() * s for q, s in zip(qs, ss)]))
    w2, s2 = fp8.requantize_to_max_scale(weight, scales, shards)
    assert s2.shape == (1,) and s2 == scales.max()
    back = fp8.dequantize(w2, s2)
    assert ((back - deq).abs() <= deq.abs() / 16 + s2 * 2 ** -9).all()


def test_output_dtype_and_scale_dtype():
    q, s = fp8.quantize(torch.randn(8, 16), "channel")
    assert fp8.dequantize(q, s, dtype=torch.bfloat16).dtype == torch.bfloat16
    out16 = fp8.dequantize(q, s.half())
    assert out16.dtype == torch.float16 and torch.equal(out16, q.half() * s.half())


def test_malformed_inputs():
    q, s = fp8.quantize(torch.randn(200, 300), "block")
    with pytest.raises(FormatError, match="needs \\(2, 3\\)"):
        fp8.dequantize(q, s[:, :2], block_size=(128, 128))
    with pytest.raises(FormatError, match="fits neither"):
        fp8.dequantize(q, torch.ones(7))
    with pytest.raises(FormatError, match="shard"):
        fp8.dequantize(q, torch.ones(3), shard_sizes=[100, 50, 49])
    with pytest.raises(FormatError, match="float8"):
        fp8.dequantize(q.float(), torch.ones(1))
    with pytest.raises(FormatError, match="strategy"):
        fp8.quantize(torch.randn(4, 4), "group")
