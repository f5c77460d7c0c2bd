"""GPTQ beyond the v1 fixtures: GPTQModel's gptq_v2 layout (true zeros) gives the same model as
the v1 file it was converted from; vLLM's kernel-flavoured names select the same format."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from formats import gptq
from tests.fixture_util import FIXTURES, prompt_logits


def _to_v2(src, dst, bits: int, group: int):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".qweight")]:
        p = key[: -len(".qweight")]
        q, zeros, scales, g_idx = gptq.unpack(tensors[key], tensors[p + ".qzeros"],
                                              tensors[p + ".scales"], tensors[p + ".g_idx"],
                                              bits, group, 1)
        qw, qz, s, gi = gptq.pack(q, zeros, scales, g_idx, bits, 2, scale_dtype=None)
        tensors.update({key: qw, p + ".qzeros": qz, p + ".scales": s, p + ".g_idx": gi})
    save_file(tensors, dst / "model.safetensors")
    for name in ("config.json", "quantize_config.json"):
        path = dst / name
        cfg = json.loads(path.read_text())
        qc = cfg.get("quantization_config", cfg)
        qc["checkpoint_format"] = qc["format"] = "gptq_v2"
        path.write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name,bits,group", [("gptq_v1_4bit_g128_asym_descact", 4, 128),
                                             ("gptq_v1_3bit_g64", 3, 64)])
def test_v2_checkpoint_equals_its_v1_source(tmp_path, name, bits, group):
    from quantrt.loader import load

    v2 = _to_v2(FIXTURES / name, tmp_path / "v2", bits, group)
    a = load(FIXTURES / name, kernels="reference", device="cpu", progress=False)
    b = load(v2, kernels="reference", device="cpu", progress=False)
    assert b.quant_config.params.version == 2
    ids = list(range(3, 20))
    assert torch.equal(prompt_logits(a, ids), prompt_logits(b, ids))


@pytest.mark.parametrize("override", ["gptq_marlin", "GPTQ"])
def test_kernel_names_load_the_same_format(override):
    from quantrt.loader import load

    lm = load(FIXTURES / "gptq_v1_4bit_g32_sym", override, device="cpu", progress=False)
    assert lm.quant_config.name == "gptq"
