"""Our GGUF writer -> gguf-py's reader and dequantizer (bit-exact with ggml): the weights it
reads back equal ours bit for bit (the other reference libraries run from their own venvs:
scripts/check_convert_roundtrip.py)."""
from __future__ import annotations

import pytest
import torch

from quantrt.convert import ConvertRequest, convert
from quantrt.convert.source import GGUFSource, is_linear_weight
from tests.tiny_models import make_tiny_model, save_bpe_tokenizer

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("gguf_type", ["Q4_0", "Q8_0", "Q5_1"])
def test_gguf_py_reads_our_weights(tmp_path, gguf_type):
    import numpy as np

    src = make_tiny_model(tmp_path / "src", hidden_size=64, intermediate_size=96,
                          num_attention_heads=4, num_key_value_heads=2)
    save_bpe_tokenizer(src)
    out = tmp_path / "m.gguf"
    convert(str(src), out, ConvertRequest("gguf", gguf_type=gguf_type), progress=False)
    ours = GGUFSource(str(out))
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    names = [n for n in ours.names if is_linear_weight(n, ours.shape(n))]
    assert len(names) == 14
    for n in names:
        t = tensors[ours._gguf_name[n]]
        assert t.tensor_type.name == gguf_type
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        theirs = ours.unpermute(n, theirs.reshape(ours.shape(n)).float())
        assert torch.equal(theirs, ours.get(n)), n
