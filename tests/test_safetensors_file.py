"""formats.safetensors_file: lazy validated checkpoints and the weights-only pickle loader."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from formats.safetensors_file import SafetensorsCheckpoint, load_torch_checkpoint
from quantrt.errors import FormatError, SourceError


class Payload:
    """A custom class: pickling it into a checkpoint must make quantrt refuse the file."""

    def __init__(self) -> None:
        self.value = 42


def _weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.randn(17, 8, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(23, 8, generator=gen).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=gen),
        "model.layers.1.qweight": torch.randint(-2 ** 31, 2 ** 31 - 1, (4, 3), dtype=torch.int32,
                                                generator=gen),
        "lm_head.weight": torch.randn(1, 8, generator=gen),
    }


@pytest.fixture
def gen():
    g = torch.Generator()
    g.seed()
    return g


@pytest.fixture
def weights(gen):
    return _weights(gen)


def _write_sharded(root, weights, prefix="model", ext="safetensors", save=None):
    names = sorted(weights)
    halves = [names[::2], names[1::2]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = f"{prefix}-{i:05d}-of-00002.{ext}"
        tensors = {n: weights[n] for n in part}
        if save is None:
            save_file(tensors, str(root / shard), metadata={"format": "pt", f"shard{i}": "yes"})
        else:
            save(tensors, root / shard)
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    index_name = f"{prefix}.{ext}.index.json"
    (root / index_name).write_text(json.dumps(index))
    return root / index_name, weight_map


def _fails(path, *needles, exc=FormatError):
    with pytest.raises(exc) as info:
        SafetensorsCheckpoint(path)
    text = str(info.value)
    for needle in needles:
        assert needle in text, text
    return text


# -- valid checkpoints -------------------------------------------------------------------

def test_single_file(tmp_path, weights):
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path), metadata={"format": "pt"})
    for src in (path, tmp_path):
        ckpt = SafetensorsCheckpoint(src)
        assert ckpt.files == [str(path)]
        assert ckpt.keys() == sorted(weights)
        assert "lm_head.weight" in ckpt and "nope" not in ckpt
        assert ckpt.metadata == {"format": "pt"}
        assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in weights.values())
        assert ckpt.info("model.layers.0.mlp.up_proj.weight") == ("BF16", (23, 8), str(path))
        for name, ref in weights.items():
            got = ckpt.get(name)
            assert got.dtype == ref.dtype and torch.equal(got, ref)
        with pytest.raises(KeyError):
            ckpt.info("nope")


def test_sharded_dir(tmp_path, weights):
    _, weight_map = _write_sharded(tmp_path, weights)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert [os.path.basename(f) for f in ckpt.files] == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert ckpt.keys() == sorted(weights)
        assert ckpt.metadata == {"format": "pt", "shard1": "yes", "shard2": "yes"}
        for name in weights:
            assert os.path.basename(ckpt.info(name)[2]) == weight_map[name]
        seen = dict(ckpt.items())
        assert list(seen) == sorted(weights, key=lambda n: (weight_map[n], n))
        for name, ref in weights.items():
            assert torch.equal(seen[name], ref)
            assert torch.equal(ckpt.get(name), ref)


def test_dir_without_index_uses_all_files(tmp_path, weights):
    names = sorted(weights)
    save_file({n: weights[n] for n in names[:3]}, str(tmp_path / "a.safetensors"))
    save_file({n: weights[n] for n in names[3:]}, str(tmp_path / "b.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert len(ckpt.files) == 2 and ckpt.keys() == names
    assert torch.equal(ckpt.get(names[-1]), weights[names[-1]])


def test_duplicate_tensor_without_index(tmp_path, weights):
    save_file(weights, str(tmp_path / "a.safetensors"))
    save_file(weights, str(tmp_path / "b.safetensors"))
    _fails(tmp_path, "appears in both", "a.safetensors", "b.safetensors")


# -- malformed files ---------------------------------------------------------------------

def test_missing_path_and_empty_dir(tmp_path):
    _fails(tmp_path / "absent", "not found", exc=SourceError)
    _fails(tmp_path, str(tmp_path), "no *.safetensors", "empty", exc=SourceError)


def test_dir_with_only_bin_files(tmp_path, weights):
    torch.save(weights, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    text = _fails(tmp_path, str(tmp_path), "no *.safetensors", "pytorch_model.bin",
                  "load_torch_checkpoint", exc=SourceError)
    assert "config.json" in text


def test_shorter_than_8_bytes(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x05\x00")
    _fails(path, str(path), "shorter than the 8-byte")


def test_header_length_too_big(tmp_path, weights):
    path = tmp_path / "big.safetensors"
    save_file(weights, str(path))
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 0, len(data) * 10)
    path.write_bytes(bytes(data))
    _fails(path, str(path), "header length", "larger than the file")


def test_garbage_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    junk = os.urandom(64)
    path.write_bytes(struct.pack("<Q", len(junk)) + junk + os.urandom(32))
    _fails(path, str(path), "not valid JSON")
    body = b"[1, 2, 3]"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    _fails(path, str(path), "not an object")


def _rewrite_header(path, mutate):
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    mutate(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])


def test_unknown_dtype_and_inconsistent_offsets(tmp_path, weights):
    path = tmp_path / "m.safetensors"
    save_file(weights, str(path))
    original = path.read_bytes()
    _rewrite_header(path, lambda h: h["lm_head.weight"].update(dtype="F17"))
    _fails(path, str(path), "'lm_head.weight'", "unknown dtype 'F17'")

    path.write_bytes(original)
    _rewrite_header(path, lambda h: h["lm_head.weight"].update(shape=[2, 8]))
    _fails(path, str(path), "'lm_head.weight'", "needs 64 bytes", "span 32")

    path.write_bytes(original)
    _rewrite_header(path, lambda h: h["lm_head.weight"].update(data_offsets=[8]))
    _fails(path, str(path), "'lm_head.weight'", "invalid data_offsets")

    path.write_bytes(original)
    _rewrite_header(path, lambda h: h["lm_head.weight"].update(shape="oops"))
    _fails(path, str(path), "'lm_head.weight'", "invalid shape")


def test_truncated_file(tmp_path, weights):
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    text = _fails(tmp_path, str(path), "truncated", "re-download")
    assert "needs data bytes" in text


def test_trailing_bytes_and_bad_metadata(tmp_path, weights):
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    original = path.read_bytes()
    path.write_bytes(original + os.urandom(16))
    _fails(path, str(path), "holds", "re-download")
    path.write_bytes(original)
    _rewrite_header(path, lambda h: h.update(__metadata__={"format": 3}))
    _fails(path, str(path), "__metadata__")


def test_index_problems(tmp_path, weights):
    index, weight_map = _write_sharded(tmp_path, weights)
    good = index.read_text()

    index.write_text("{not json")
    _fails(tmp_path, str(index), "not valid JSON")

    index.write_text(json.dumps({"metadata": {}}))
    _fails(tmp_path, str(index), "weight_map")

    wm = dict(weight_map, **{"extra.weight": "model-00003-of-00003.safetensors"})
    index.write_text(json.dumps({"weight_map": wm}))
    _fails(tmp_path, str(index), "'model-00003-of-00003.safetensors'", "missing")

    wrong = dict(weight_map)
    name = sorted(weights)[0]
    wrong[name] = next(s for s in set(weight_map.values()) if s != weight_map[name])
    index.write_text(json.dumps({"weight_map": wrong}))
    _fails(tmp_path, str(index), repr(name), "does not contain")

    index.write_text(good)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    _fails(tmp_path, "'model-00002-of-00002.safetensors'", "missing", "re-download")


# -- legacy pickles ----------------------------------------------------------------------

def test_torch_bin_state_dict(tmp_path, weights):
    path = tmp_path / "pytorch_model.bin"
    torch.save(weights, path)
    for src in (path, tmp_path):
        loaded = load_torch_checkpoint(src)
        assert sorted(loaded) == sorted(weights)
        for name, ref in weights.items():
            assert loaded[name].dtype == ref.dtype and torch.equal(loaded[name], ref)


def test_torch_wrapped_and_legacy_format(tmp_path, weights):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": weights, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    loaded = load_torch_checkpoint(path)
    assert sorted(loaded) == sorted(weights)
    assert all(torch.equal(loaded[n], weights[n]) for n in weights)


def test_torch_sharded_bin(tmp_path, weights):
    _, weight_map = _write_sharded(tmp_path, weights, prefix="pytorch_model", ext="bin",
                                   save=lambda t, p: torch.save(t, p))
    loaded = load_torch_checkpoint(tmp_path)
    assert sorted(loaded) == sorted(weights)
    assert all(torch.equal(loaded[n], weights[n]) for n in weights)

    os.remove(tmp_path / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(FormatError, match="pytorch_model-00001-of-00002.bin"):
        load_torch_checkpoint(tmp_path)


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_with_custom_object_is_refused(tmp_path, weights, zipfile):
    path = tmp_path / "evil.bin"
    torch.save({**weights, "payload": Payload()}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(FormatError) as info:
        load_torch_checkpoint(path)
    text = str(info.value)
    assert str(path) in text
    assert "pickled code/objects" in text and "refuses to execute" in text
    assert "Payload" in text and "safetensors" in text


def test_non_checkpoint_files(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(os.urandom(256))
    with pytest.raises(FormatError) as info:
        load_torch_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(SourceError):
        load_torch_checkpoint(tmp_path / "absent.bin")
