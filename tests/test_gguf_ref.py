"""quant_kernels.gguf_ref must reproduce gguf.quants.dequantize bit for bit.

Inputs: where gguf-py can quantize a type, fresh random floats are quantized with it;
for every block type, also random blocks whose float scale fields are overwritten with
finite values (random fp16 bytes would give NaN/inf, and NaN != NaN breaks equality).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from quant_kernels import gguf_ref
from quant_kernels import gguf_ref_base
from quantrt.errors import FormatError, UnsupportedError

# Types gguf-py can quantize (so real-looking inputs can be produced).
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
               Q.TQ1_0, Q.TQ2_0, Q.MXFP4]

# Byte offsets of the fp16 scale fields inside one block, per type.  Types absent here
# (MXFP4, NVFP4) have only 8-bit scale codes, for which every byte value is finite.
F16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
    Q.TQ1_0: [52], Q.TQ2_0: [64],
    Q.IQ2_XXS: [0], Q.IQ2_XS: [0], Q.IQ2_S: [0], Q.IQ3_XXS: [0], Q.IQ3_S: [0],
    Q.IQ1_S: [0], Q.IQ4_NL: [0], Q.IQ4_XS: [0],
}
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}
BLOCK_TYPES = [Q(t) for t in gguf_ref.supported_types() if Q(t) not in FLOAT_TYPES]
ROWS = [1, 17, 23]
COLS = [1, 2, 3]  # blocks per row


def _finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n finite fp16 values over a wide range (subnormals included), as uint16."""
    mag = np.exp2(rng.uniform(-26, 6, n)) * rng.choice([-1.0, 1.0], n)
    return mag.astype(np.float16).view(np.uint16)


def _random_blocks(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, type_size = gguf_ref.block_info(qtype)
    raw = rng.integers(0, 256, (rows, cols, type_size), dtype=np.uint8)
    n = rows * cols
    for off in F16_FIELDS.get(qtype, []):
        raw[:, :, off:off + 2] = _finite_f16(rng, n).view(np.uint8).reshape(rows, cols, 2)
    if qtype == Q.IQ1_M:
        # the fp16 d is spread over the top nibbles of the four trailing uint16 scales
        d = _finite_f16(rng, n).astype(np.uint32)
        sc = raw[:, :, 48:56].copy().view(np.uint16).reshape(n, 4).astype(np.uint32)
        for i in range(4):
            sc[:, i] = (sc[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        raw[:, :, 48:56] = sc.astype(np.uint16).view(np.uint8).reshape(rows, cols, 8)
    if qtype == Q.MXFP4:
        # exponent bytes >= 252 overflow to inf in both implementations; keep it finite
        raw[:, :, 0] = np.minimum(raw[:, :, 0], 250)
    if qtype == Q.Q8_K:
        d = (rng.standard_normal(n) * 1e-2).astype(np.float32)
        raw[:, :, 0:4] = d.view(np.uint8).reshape(rows, cols, 4)
    return raw.reshape(rows, cols * type_size)


def _reference(raw: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.Q8_K:
        # gguf-py has no Q8_K; ggml's dequantize_row_q8_K is y = d * q
        blocks = raw.reshape(-1, 292)
        d = blocks[:, :4].copy().view(np.float32)
        q = blocks[:, 4:260].view(np.int8).astype(np.float32)
        return (d * q).reshape(raw.shape[0], -1)
    return gq.dequantize(raw, qtype)


def _assert_bit_exact(ours: torch.Tensor, ref: np.ndarray) -> None:
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    assert ours.dtype == torch.float32
    assert ours.shape == ref_t.shape
    assert not torch.isnan(ref_t).any(), "test input produced NaN; fix the generator"
    if not torch.equal(ours, ref_t):
        bad = (ours != ref_t).nonzero()[:5].tolist()
        raise AssertionError(f"{(ours != ref_t).sum().item()} values differ, e.g. at {bad}: "
                             f"{[ours[tuple(i)].item() for i in bad]} vs "
                             f"{[ref_t[tuple(i)].item() for i in bad]}")


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_random_floats(qtype: Q, rows: int, cols: int) -> None:
    block_size, _ = gguf_ref.block_info(qtype)
    rng = np.random.default_rng(1000 * int(qtype) + 10 * rows + cols)
    n_values = cols * max(block_size, 32)  # float types: a few values per "column"
    x = (rng.standard_normal((rows, n_values)) * rng.uniform(0.01, 10)).astype(np.float32)
    packed = gq.quantize(x, qtype)
    ref = gq.dequantize(packed, qtype)
    raw = torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8))
    _assert_bit_exact(gguf_ref.dequantize(raw, int(qtype)), ref)


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks(qtype: Q, rows: int, cols: int) -> None:
    raw = _random_blocks(qtype, rows, cols, seed=7 * int(qtype) + 100 * rows + cols)
    ours = gguf_ref.dequantize(torch.from_numpy(raw), int(qtype))
    _assert_bit_exact(ours, _reference(raw, qtype))


def test_every_gguf_py_type_is_supported() -> None:
    # a new gguf release that learns a type should make this fail, not silently lag
    missing = [t.name for t in gq._type_traits if int(t) not in gguf_ref.supported_types()]
    assert not missing


def test_float_tensors_pass_through() -> None:
    x = torch.randn(3, 5)
    assert torch.equal(gguf_ref.dequantize(x.half(), Q.F16), x.half().float())
    assert torch.equal(gguf_ref.dequantize(x.bfloat16(), Q.BF16), x.bfloat16().float())
    assert torch.equal(gguf_ref.dequantize(x, Q.F32, shape=(15,)), x.reshape(15))
    with pytest.raises(TypeError):
        gguf_ref.dequantize(x, Q.F16)
    # results never alias the input (it may be a read-only mmap)
    assert gguf_ref.dequantize(x, Q.F32).data_ptr() != x.data_ptr()
    raw = torch.zeros(1 + 4 * 15, dtype=torch.uint8)
    raw[1:] = x.reshape(-1).view(torch.uint8)
    out = gguf_ref.dequantize(raw[1:], Q.F32, shape=(3, 5))  # misaligned start
    assert torch.equal(out, x) and out.data_ptr() != raw.data_ptr() + 1


def test_shape_dtype_and_leading_dims() -> None:
    raw = torch.from_numpy(_random_blocks(Q.Q8_0, 6, 2, seed=3))
    flat = gguf_ref.dequantize(raw, Q.Q8_0)
    assert flat.shape == (6, 64)
    assert gguf_ref.dequantize(raw.reshape(2, 3, 68), Q.Q8_0).shape == (2, 3, 64)
    assert torch.equal(gguf_ref.dequantize(raw.reshape(-1), Q.Q8_0, shape=(3, 128)),
                       flat.reshape(3, 128))
    half = gguf_ref.dequantize(raw, Q.Q8_0, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, flat.half())
    # a non-contiguous view must give the same values as its copy
    wide = torch.from_numpy(_random_blocks(Q.Q8_0, 6, 4, seed=4))
    assert torch.equal(gguf_ref.dequantize(wide[:, 34:102], Q.Q8_0),
                       gguf_ref.dequantize(wide[:, 34:102].contiguous(), Q.Q8_0))


def test_chunked_path_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _random_blocks(Q.Q4_K, 5, 3, seed=5)
    whole = gguf_ref.dequantize(torch.from_numpy(raw), Q.Q4_K)
    monkeypatch.setattr(gguf_ref_base, "_CHUNK_VALUES", 512)  # 2 blocks per chunk
    assert torch.equal(gguf_ref.dequantize(torch.from_numpy(raw), Q.Q4_K), whole)


def test_errors() -> None:
    with pytest.raises(UnsupportedError, match="Q8_1"):
        gguf_ref.dequantize(torch.zeros(1, 40, dtype=torch.uint8), Q.Q8_1)
    with pytest.raises(UnsupportedError, match="999"):
        gguf_ref.dequantize(torch.zeros(1, 40, dtype=torch.uint8), 999)
    with pytest.raises(FormatError, match="18-byte"):
        gguf_ref.dequantize(torch.zeros(2, 20, dtype=torch.uint8), Q.Q4_0)
    with pytest.raises(FormatError, match="shape"):
        gguf_ref.dequantize(torch.zeros(2, 18, dtype=torch.uint8), Q.Q4_0, shape=(3, 32))


def test_api_helpers() -> None:
    assert gguf_ref.block_info(Q.Q4_K) == (256, 144)
    assert gguf_ref.block_info(Q.Q8_1) == (32, 40)  # known but not dequantizable
    assert gguf_ref.type_name(Q.IQ2_XS) == "IQ2_XS"
    assert gguf_ref.type_name(999) == "unknown(999)"
    assert int(Q.Q4_0) in gguf_ref.supported_types()
    assert int(Q.Q8_1) not in gguf_ref.supported_types()
    with pytest.raises(UnsupportedError):
        gguf_ref.block_info(999)


def test_real_smollm2_file(demo_gguf) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(demo_gguf))
    q4_1 = [t for t in reader.tensors if t.tensor_type == Q.Q4_1][:4]
    assert q4_1, "expected Q4_1 tensors in the Q4_1 file"
    for t in q4_1:
        ours = gguf_ref.dequantize(torch.from_numpy(np.array(t.data)), t.tensor_type)
        _assert_bit_exact(ours, gq.dequantize(t.data, t.tensor_type))

    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert emb.tensor_type == Q.Q8_0
    # a private copy: the reader's memmap is read-only (torch warns) and the copy puts
    # the bytes in RAM, so the timings below compare dequantization, not disk reads
    data = np.array(emb.data)
    raw = torch.from_numpy(data)
    gguf_ref.dequantize(raw, emb.tensor_type)  # first touch of the output allocator
    t0 = time.perf_counter()
    ours = gguf_ref.dequantize(raw, emb.tensor_type)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = gq.dequantize(data, emb.tensor_type)
    t_gguf = time.perf_counter() - t0
    assert tuple(ours.shape) == (49152, 576)
    _assert_bit_exact(ours, ref)
    print(f"\ntoken_embd 49152x576 Q8_0: gguf_ref {t_ours * 1e3:.0f} ms, "
          f"gguf numpy {t_gguf * 1e3:.0f} ms")
