"""formats.packing: bit-exact round trips, hand-checked words, compressed-tensors golden."""
import pytest
import torch

from formats.packing import pack_bits, packed_length, to_signed, to_unsigned, unpack_bits
from quantrt.errors import FormatError

COUNTS = [1, 17, 23, 32, 96, 100, 1376]


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_round_trip_all_axes(bits, dense):
    gen = torch.Generator().manual_seed(bits * 10 + dense)
    for n in COUNTS:
        for axis, shape in ((0, (n, 5)), (1, (3, n)), (-1, (2, 3, n)), (-2, (n, 4))):
            v = torch.randint(0, 1 << bits, shape, generator=gen)
            words = pack_bits(v, bits, axis=axis, dense=dense)
            ax = axis % v.ndim
            assert words.dtype == torch.int32
            assert words.shape[ax] == packed_length(n, bits, dense)
            assert torch.equal(unpack_bits(words, bits, n, axis=axis, dense=dense), v.int())
            # packing what we unpacked reproduces the words bit for bit
            again = pack_bits(unpack_bits(words, bits, n, axis=axis, dense=dense), bits,
                              axis=axis, dense=dense)
            assert torch.equal(again, words)


def test_known_words():
    # 4-bit: value i at bits [4i, 4i+4): 1..8 -> 0x87654321 (negative as int32)
    w = pack_bits(torch.arange(1, 9)[None], 4)
    assert w.tolist() == [[0x87654321 - (1 << 32)]]
    # 8-bit LSB first
    assert pack_bits(torch.tensor([[1, 2, 3, 4]]), 8).tolist() == [[0x04030201]]
    # 3-bit dense: value 10 straddles words 0/1 (bits 30..32), value 21 words 1/2
    v = torch.zeros(1, 32, dtype=torch.int64)
    v[0, 10] = 0b111
    v[0, 21] = 0b101
    assert pack_bits(v, 3).tolist() == [[-(1 << 31) + (1 << 30), 0b1 - (1 << 31), 0b10]]
    # 3-bit per-word: 10 values per word, top two bits unused
    assert pack_bits(torch.full((1, 10), 7), 3, dense=False).tolist() == [[(1 << 30) - 1]]


def test_padding_is_zero_and_lengths():
    w = pack_bits(torch.full((1, 9), 15), 4)  # 9 nibbles -> 2 words, 7 padding nibbles zero
    assert w.tolist() == [[-1, 0xF]]
    assert packed_length(32, 3) == 3 and packed_length(33, 3) == 4
    assert packed_length(32, 3, dense=False) == 4 and packed_length(1376, 4) == 172
    assert packed_length(23, 5) == 4 and packed_length(23, 5, dense=False) == 4


def test_signed_offset_helpers():
    v = torch.arange(-4, 4)
    assert torch.equal(to_signed(to_unsigned(v, 3), 3), v.int())
    assert to_unsigned(v, 3).min() == 0


def test_malformed_inputs():
    with pytest.raises(FormatError, match="range"):
        pack_bits(torch.tensor([[16]]), 4, name="q")
    with pytest.raises(FormatError, match="range"):
        pack_bits(torch.tensor([[-1]]), 4)
    with pytest.raises(FormatError, match="integer"):
        pack_bits(torch.zeros(1, 8), 4)
    with pytest.raises(FormatError, match="9-bit"):
        pack_bits(torch.zeros(1, 8, dtype=torch.int32), 9)
    with pytest.raises(FormatError, match="need 2"):
        unpack_bits(torch.zeros(4, 3, dtype=torch.int32), 4, 9, name="qweight")
    with pytest.raises(FormatError, match="int32"):
        unpack_bits(torch.zeros(4, 2, dtype=torch.int64), 4, 9)


def test_golden_compressed_tensors_dense_packing():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        for n in (1, 23, 96, 1376):
            for dim, shape in ((1, (7, n)), (0, (n, 5))):
                v = torch.randint(0, 1 << bits, shape, generator=gen)
                signed = (v - (1 << (bits - 1))).to(torch.int8)
                ref = helpers.pack_to_int32(signed, bits, packed_dim=dim)
                assert torch.equal(pack_bits(v, bits, axis=dim), ref), (bits, n, dim)
                back = helpers.unpack_from_int32(ref, bits, torch.Size(shape), packed_dim=dim)
                assert torch.equal(to_signed(unpack_bits(ref, bits, n, axis=dim), bits),
                                   back.int())
