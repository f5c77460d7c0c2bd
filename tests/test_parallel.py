"""Tensor parallelism on the CPU (gloo, 2 ranks): every quantization method's fixture, the
demo GGUF and odd shapes (intermediate 1376, one KV head on 2 ranks) give the same logits
and greedy tokens as one process.

One 2-rank group loads every model in turn (tests/tp_ranks.py); the single-process side
runs here.  Tolerances: with the reference kernels (fp32 dequantize + F.linear) only the
summation order differs (row-parallel partial sums): max |diff| <= 1e-4 x the logit range,
and greedy tokens equal.  With the default CPU kernels (bf16 activations into tinygemm)
each rank rounds its own partial product: max |diff| <= 3% of the logit range.  FP8 W8A8
(compressed-tensors ct_fp8_*) quantizes activations per token on each rank's own slice of
K (as vLLM does), a different rounding from one process: <= 5%, greedy tokens still equal.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import make_tiny_model, write_int_checkpoint
from tests.tp_ranks import greedy

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists())
ODD = ["odd_bf16", "odd_awq_g32", "odd_gptq_g32"]
SOURCES = FIXTURE_NAMES + ODD + ["demo"]
CASES = [(s, k) for s in SOURCES for k in ("reference", "auto")]
PROMPT = [1, 57, 3, 101, 200, 9, 17, 33, 5, 250, 64]
DEMO_PROMPT = [1, 504, 3575, 282, 4649, 314, 1345, 260, 1217, 33, 2012]
STEPS = 6
REF_TOL, AUTO_TOL, W8A8_TOL = 1e-4, 0.03, 0.05


def _source(name: str, root: Path) -> str:
    if name == "demo":
        from quantrt.sources import resolve_source

        return str(resolve_source("demo").path)
    if name in ODD:
        return str(root / name)
    return str(FIXTURES / name)


def _build_odd(root: Path) -> None:
    base = make_tiny_model(root / "odd_bf16", hidden_size=128, intermediate_size=1376,
                           num_attention_heads=4, num_key_value_heads=1, seed=3)
    write_int_checkpoint(base, root / "odd_awq_g32", "awq", group_size=32)
    write_int_checkpoint(base, root / "odd_gptq_g32", "gptq", group_size=32)


def _jobs(root: Path) -> list[dict]:
    return [{"source": _source(s, root), "kernels": k, "steps": STEPS,
             "prompt": DEMO_PROMPT if s == "demo" else PROMPT} for s, k in CASES]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("tp")
    _build_odd(root)
    jobs = root / "jobs.json"
    jobs.write_text(json.dumps(_jobs(root)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = root / "tp2.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(__file__).parent / "tp_ranks.py"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(port), str(out),
                               str(jobs)], env=env, cwd=Path(__file__).parent.parent,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return root, torch.load(out)


@pytest.mark.parametrize("source,kernels", CASES)
def test_tp2_equals_tp1(tp2, source, kernels):
    from quantrt.eval import prompt_logits
    from quantrt.loader import load

    root, results = tp2
    job = _jobs(root)[CASES.index((source, kernels))]
    got = results[CASES.index((source, kernels))]
    lm = load(job["source"], device="cpu", kernels=kernels, progress=False)
    want = prompt_logits(lm, job["prompt"]).cpu()
    span = float(want.max() - want.min())
    diff = float((got["logits"] - want).abs().max())
    tol = (W8A8_TOL if source.startswith("ct_fp8") else
           REF_TOL if kernels == "reference" else AUTO_TOL) * span
    assert diff <= tol, f"max |logit diff| {diff:.3g} > {tol:.3g} (logit range {span:.3g})"
    if kernels == "reference":
        assert got["greedy"] == greedy(lm, job["prompt"], STEPS)
