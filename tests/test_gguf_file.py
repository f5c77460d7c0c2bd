"""formats.gguf_file: valid files round-trip against gguf.GGUFReader; corrupt ones fail
with a FormatError that names the file and the problem (never another exception)."""
from __future__ import annotations

import os
import struct
import time

import gguf
import numpy as np
import pytest
import torch

from formats.gguf_file import GGUFFile, read_gguf
from quantrt.errors import FormatError, SourceError

Q = gguf.GGMLQuantizationType
TOKENS = ["<s>", "</s>", "hello", "Ġworld", "héllo", "日本語", "", "🙂", "a b"] * 7


def _build(path, rng, *, extra_kv=None, alignment=None, endian=gguf.GGUFEndian.LITTLE):
    """Write a small GGUF and return {name: (source array, ggml type)}."""
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint32("llama.block_count", 3)
    w.add_int32("test.int32", -7)
    w.add_int64("test.int64", -(2 ** 40))
    w.add_uint64("test.uint64", 2 ** 63 + 5)
    w.add_float32("test.float32", 0.25)
    w.add_float64("test.float64", 1e-300)
    w.add_bool("test.bool", True)
    w.add_string("general.name", "tiny-test ✓")
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_array("test.ints", [3, 1, 4, 1, 5])
    w.add_array("test.floats", [0.5, -1.5])
    for key, value in (extra_kv or {}).items():
        w.add_uint32(key, value)

    made = {}
    def put(name, arr, qtype):
        if qtype in (Q.F32, Q.F16):
            data = arr.astype(np.float16 if qtype == Q.F16 else np.float32)
            w.add_tensor(name, data)
        elif qtype == Q.Q4_K:
            data = arr  # random bytes: gguf-py cannot quantize K-quants
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        made[name] = (data, qtype)

    put("token_embd.weight", rng.standard_normal((23, 8)).astype(np.float32), Q.F32)
    put("blk.0.attn_norm.weight", rng.standard_normal(7).astype(np.float32), Q.F32)
    put("blk.0.ffn_up.weight", rng.standard_normal((17, 5)).astype(np.float32), Q.F16)
    put("blk.0.attn_q.weight", rng.standard_normal((1, 64)).astype(np.float32), Q.Q8_0)
    put("blk.0.attn_k.weight", rng.standard_normal((17, 32)).astype(np.float32), Q.Q4_0)
    put("blk.0.attn_v.weight", rng.standard_normal((23, 96)).astype(np.float32), Q.Q4_1)
    put("blk.0.attn_output.weight", rng.standard_normal((2, 3, 32)).astype(np.float32), Q.Q5_1)
    put("blk.0.ffn_down.weight", rng.standard_normal((5, 64)).astype(np.float32), Q.BF16)
    put("blk.0.ffn_gate.weight", rng.integers(0, 256, (3, 2 * 144), dtype=np.uint8), Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return made


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.fixture
def good(tmp_path, rng):
    path = tmp_path / "good.gguf"
    made = _build(path, rng)
    return path, made


def _tensor_field(data: bytes, name: str) -> dict[str, int]:
    """Byte positions of a tensor info's fields, found by its (unique) name."""
    enc = name.encode()
    start = data.index(struct.pack("<Q", len(enc)) + enc) + 8 + len(enc)
    (n_dims,) = struct.unpack_from("<I", data, start)
    return {"n_dims": start, "ne0": start + 4, "type": start + 4 + 8 * n_dims,
            "offset": start + 4 + 8 * n_dims + 4}


def _corrupt(src, dst, edits=(), cut=None) -> str:
    data = bytearray(src.read_bytes())
    for pos, fmt, value in edits:
        struct.pack_into(fmt, data, pos, value)
    if cut is not None:
        data = data[:cut]
    dst.write_bytes(bytes(data))
    return str(dst)


def _fails(path, *needles) -> FormatError:
    with pytest.raises(FormatError) as info:
        read_gguf(path)
    text = str(info.value)
    assert str(path) in text
    for needle in needles:
        assert needle in text, text
    assert "\n" not in text
    return info.value


# -- valid files -------------------------------------------------------------------------

def test_metadata(good):
    path, _ = good
    with read_gguf(path) as f:
        assert f.version == 3
        assert f.alignment == 32
        assert f.file_size == os.path.getsize(path)
        assert f.get("general.architecture") == "llama"
        assert f.get("llama.block_count") == 3
        assert f.get("test.int32") == -7
        assert f.get("test.int64") == -(2 ** 40)
        assert f.get("test.uint64") == 2 ** 63 + 5
        assert f.get("test.float32") == 0.25
        assert f.get("test.float64") == 1e-300
        assert f.get("test.bool") is True
        assert f.get("general.name") == "tiny-test ✓"
        assert f.get("tokenizer.ggml.tokens") == TOKENS
        assert f.get("test.ints") == [3, 1, 4, 1, 5]
        assert f.get("test.floats") == [0.5, -1.5]
        assert f.get("missing", "dflt") == "dflt"


def test_metadata_matches_gguf_reader(good):
    path, _ = good
    ref = gguf.GGUFReader(path)
    f = read_gguf(path)
    for field in ref.fields.values():
        if field.name.startswith("GGUF."):
            continue
        assert f.metadata[field.name] == field.contents(), field.name
    assert list(f.metadata) == [k for k in ref.fields if not k.startswith("GGUF.")]


def test_tensors_match_gguf_reader(good):
    path, made = good
    ref = gguf.GGUFReader(path)
    f = read_gguf(path)
    assert list(f.tensors) == [t.name for t in ref.tensors] == list(made)
    assert f.data_offset == ref.data_offset
    for t in ref.tensors:
        info = f.tensors[t.name]
        assert info.shape == tuple(int(x) for x in reversed(t.shape))
        assert info.ggml_type == t.tensor_type
        assert info.type_name == t.tensor_type.name
        assert info.offset == t.data_offset
        assert info.nbytes == t.n_bytes
        raw = f.raw(t.name)
        assert raw.tobytes() == np.asarray(t.data).tobytes(), t.name
        data, _ = made[t.name]
        assert raw.tobytes() == data.tobytes(), t.name


def test_raw_shapes_and_dtypes(good):
    path, made = good
    f = read_gguf(path)
    assert f.raw("token_embd.weight").dtype == np.float32
    np.testing.assert_array_equal(f.raw("token_embd.weight"), made["token_embd.weight"][0])
    np.testing.assert_array_equal(f.raw("blk.0.attn_norm.weight"),
                                  made["blk.0.attn_norm.weight"][0])
    assert f.raw("blk.0.ffn_up.weight").dtype == np.float16
    assert f.raw("blk.0.attn_q.weight").shape == (1, 68)         # Q8_0: 2 blocks of 34 bytes
    assert f.raw("blk.0.attn_k.weight").shape == (17, 18)        # Q4_0
    assert f.raw("blk.0.attn_v.weight").shape == (23, 60)        # Q4_1: 3 blocks of 20
    assert f.raw("blk.0.attn_output.weight").shape == (2, 3, 24)  # Q5_1, 3-D
    assert f.tensors["blk.0.attn_output.weight"].shape == (2, 3, 32)
    assert f.raw("blk.0.ffn_gate.weight").shape == (3, 288)      # Q4_K: 2 blocks of 144
    assert f.tensors["blk.0.ffn_gate.weight"].shape == (3, 512)
    assert f.raw("blk.0.ffn_down.weight").dtype == np.uint16      # BF16 bits


def test_tensor_is_zero_copy_and_private(good, tmp_path):
    path, made = good
    before = path.read_bytes()
    f = read_gguf(path)
    t = f.tensor("token_embd.weight")
    assert t.dtype == torch.float32
    assert t.data_ptr() == f.raw("token_embd.weight").ctypes.data
    torch.testing.assert_close(t, torch.from_numpy(made["token_embd.weight"][0]))
    t.mul_(2)  # copy-on-write mapping: must not crash and must not touch the file
    assert path.read_bytes() == before
    bf = f.tensor("blk.0.ffn_down.weight")
    assert bf.dtype == torch.bfloat16 and bf.shape == (5, 64)
    assert f.tensor("blk.0.attn_k.weight").dtype == torch.uint8


def test_close_keeps_views_alive(good):
    path, made = good
    with read_gguf(path) as f:
        view = f.raw("token_embd.weight")
    np.testing.assert_array_equal(view, made["token_embd.weight"][0])
    with pytest.raises(ValueError):
        f.raw("token_embd.weight")
    with pytest.raises(KeyError):
        read_gguf(path).raw("nope")


def test_custom_alignment(tmp_path, rng):
    path = tmp_path / "al.gguf"
    made = _build(path, rng, alignment=64)
    f = read_gguf(path)
    assert f.alignment == 64 and f.data_offset % 64 == 0
    for name, (data, _) in made.items():
        assert f.tensors[name].offset % 64 == 0
        assert f.raw(name).tobytes() == data.tobytes()


def test_vocab_only_file(tmp_path):
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    f = read_gguf(path)
    assert f.tensors == {} and f.get("tokenizer.ggml.tokens") == TOKENS


# -- bad input ---------------------------------------------------------------------------

def test_missing_and_not_a_file(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")
    _fails(tmp_path, "not a regular file")


def test_empty_and_short_files(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _fails(empty, "shorter than")
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    _fails(short, "shorter than")


def test_bad_magic(good, tmp_path):
    path = _corrupt(good[0], tmp_path / "magic.gguf", [(0, "<4s", b"PK\x03\x04")])
    _fails(path, "bad magic", "PK\\x03\\x04", "'GGUF'")


def test_bad_version(good, tmp_path):
    _fails(_corrupt(good[0], tmp_path / "v99.gguf", [(4, "<I", 99)]), "version 99")
    _fails(_corrupt(good[0], tmp_path / "v1.gguf", [(4, "<I", 1)]), "version 1")


def test_big_endian(tmp_path, rng):
    path = tmp_path / "be.gguf"
    _build(path, rng, endian=gguf.GGUFEndian.BIG)
    _fails(path, "big-endian")


def test_absurd_counts(good, tmp_path):
    _fails(_corrupt(good[0], tmp_path / "tc.gguf", [(8, "<Q", 2 ** 60)]),
           "absurd tensor_count", str(2 ** 60))
    _fails(_corrupt(good[0], tmp_path / "kv.gguf", [(16, "<Q", 2 ** 40)]),
           "absurd kv_count", str(2 ** 40))


def test_truncated_data(good, tmp_path):
    path, _ = good
    size = os.path.getsize(path)
    last = max(read_gguf(path).tensors.values(), key=lambda t: t.offset)
    for cut in (last.offset + last.nbytes - 1, last.offset + 3, size - 4096):
        if cut <= last.offset - 1:
            continue
        bad = _corrupt(path, tmp_path / f"cut{cut}.gguf", cut=cut)
        _fails(bad, "truncated", repr(last.name), f"file has {cut} bytes", "re-download")


def test_truncated_anywhere_in_header(good, tmp_path):
    path, _ = good
    end = read_gguf(path).data_offset
    bad = tmp_path / "cut.gguf"
    data = path.read_bytes()
    for cut in range(0, end, 3):
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError) as info:
            read_gguf(bad)
        assert str(bad) in str(info.value)


def test_random_header_corruption_only_raises_format_error(good, tmp_path, rng):
    path, _ = good
    data = path.read_bytes()
    end = read_gguf(path).data_offset
    bad = tmp_path / "flip.gguf"
    for _ in range(300):
        buf = bytearray(data)
        for pos in rng.integers(4, end, size=int(rng.integers(1, 4))):
            buf[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(buf))
        try:
            read_gguf(bad)
        except FormatError as exc:
            assert str(bad) in str(exc)


def test_offset_past_end(good, tmp_path):
    path, _ = good
    pos = _tensor_field(path.read_bytes(), "blk.0.attn_k.weight")["offset"]
    bad = _corrupt(path, tmp_path / "off.gguf", [(pos, "<Q", 2 ** 20)])
    _fails(bad, "truncated", "'blk.0.attn_k.weight'", "re-download")


def test_offset_unaligned(good, tmp_path):
    path, _ = good
    data = path.read_bytes()
    pos = _tensor_field(data, "blk.0.attn_k.weight")["offset"]
    (off,) = struct.unpack_from("<Q", data, pos)
    _fails(_corrupt(path, tmp_path / "un.gguf", [(pos, "<Q", off + 4)]),
           "'blk.0.attn_k.weight'", "not a multiple of the alignment 32")


def test_unknown_ggml_type(good, tmp_path):
    path, _ = good
    pos = _tensor_field(path.read_bytes(), "blk.0.attn_v.weight")["type"]
    _fails(_corrupt(path, tmp_path / "ty.gguf", [(pos, "<I", 200)]),
           "'blk.0.attn_v.weight'", "unknown ggml type 200")


def test_bad_dims(good, tmp_path):
    path, _ = good
    fields = _tensor_field(path.read_bytes(), "blk.0.attn_q.weight")
    _fails(_corrupt(path, tmp_path / "n0.gguf", [(fields["n_dims"], "<I", 0)]),
           "'blk.0.attn_q.weight'", "0 dimensions")
    _fails(_corrupt(path, tmp_path / "n9.gguf", [(fields["n_dims"], "<I", 9)]),
           "'blk.0.attn_q.weight'", "9 dimensions")
    _fails(_corrupt(path, tmp_path / "z.gguf", [(fields["ne0"], "<Q", 0)]),
           "'blk.0.attn_q.weight'", "zero dimension")
    _fails(_corrupt(path, tmp_path / "huge.gguf", [(fields["ne0"], "<Q", 2 ** 62)]),
           "'blk.0.attn_q.weight'", "absurd shape")
    _fails(_corrupt(path, tmp_path / "blk.gguf", [(fields["ne0"], "<Q", 48)]),
           "'blk.0.attn_q.weight'", "Q8_0", "block size 32")


def test_duplicate_tensor_name(good, tmp_path):
    path, _ = good
    data = path.read_bytes()
    pos = data.index(b"blk.0.attn_k.weight")
    bad = _corrupt(path, tmp_path / "dup.gguf", [(pos, "<19s", b"blk.0.attn_q.weight")])
    _fails(bad, "duplicate tensor name", "'blk.0.attn_q.weight'")


def test_bad_strings_and_value_types(good, tmp_path):
    path, _ = good
    # The first kv's key length sits right after the 24-byte header.
    _fails(_corrupt(path, tmp_path / "sl.gguf", [(24, "<Q", 2 ** 50)]),
           "string length", "past the end of the file")
    data = path.read_bytes()
    key = b"general.architecture"
    vtype_pos = data.index(key) + len(key)
    _fails(_corrupt(path, tmp_path / "vt.gguf", [(vtype_pos, "<I", 77)]),
           "'general.architecture'", "unknown value type 77")
    tok = b"tokenizer.ggml.tokens"
    count_pos = data.index(tok) + len(tok) + 8  # after value type and item type
    _fails(_corrupt(path, tmp_path / "ac.gguf", [(count_pos, "<Q", 2 ** 59)]),
           "'tokenizer.ggml.tokens'", "claims")


def test_alignment_not_power_of_two(tmp_path, rng):
    path = tmp_path / "al.gguf"
    _build(path, rng, extra_kv={"general.alignment": 24})
    _fails(path, "general.alignment", "not a power of two")


# -- a real model ------------------------------------------------------------------------

def test_real_smollm2(demo_gguf):
    start = time.perf_counter()
    f = GGUFFile(demo_gguf)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"metadata parse took {elapsed:.2f}s"
    assert len(f.tensors) == 272
    assert f.get("general.architecture") == "llama"
    assert len(f.get("tokenizer.ggml.tokens")) == f.get("llama.vocab_size", 49152)
    q = f.tensors["blk.0.attn_q.weight"]
    assert q.type_name == "Q4_1" and q.shape == (576, 576)
    assert f.raw(q.name).shape == (576, 576 // 32 * 20)
