"""The estimator's GPU bytes of GGML linear weights (layouts.GGML_ON_GPU) against the
layouts the CUDA kernels actually build from random blocks (gguf_wq.to_wq, g16_layout.to_g16),
and the rule that only linear layers are repacked."""
from __future__ import annotations

import gguf
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from quant_kernels import g16_layout, gguf_wq
from quantrt.estimate.layouts import GGML_ON_GPU, nbytes


@pytest.mark.parametrize("name", sorted(GGML_ON_GPU))
@pytest.mark.parametrize("n,k", [(1, 256), (17, 512), (23, 768)])
def test_table_matches_repacked_bytes(name, n, k):
    qt = Q[name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = torch.randint(0, 256, (n, k // block * size), dtype=torch.uint8)
    if qt in g16_layout.TYPES:
        got = g16_layout.to_g16(raw, qt, k).nbytes
    else:
        got = gguf_wq.to_wq(raw, qt, k, torch.float16).nbytes
    assert nbytes(f"cuda:{name}", n * k) == got


def test_every_repacked_type_is_in_the_table():
    kernels = set(gguf_wq.SUPPORTED) | set(g16_layout.TYPES)
    assert {Q[name] for name in GGML_ON_GPU} == kernels


def test_types_without_a_repack_count_as_stored():
    assert nbytes("cuda:IQ4_NL", 256) == nbytes("IQ4_NL", 256)
    assert nbytes("cuda:F16", 256) == 512
