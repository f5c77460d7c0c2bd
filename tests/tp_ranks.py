"""One rank of a CPU (gloo) tensor-parallel group, for tests/test_parallel.py:

    python tests/tp_ranks.py RANK SIZE PORT OUT.pt JOBS.json

For each job (source, kernels, prompt, steps) every rank loads its part of the model and
runs the same forwards; rank 0 saves the full-prompt logits and a greedy continuation
(recomputed from scratch each step: this isolates the sharded weights from the engine).
"""
from __future__ import annotations

import json
import sys

import torch


def greedy(lm, ids: list[int], steps: int) -> list[int]:
    from quantrt.eval import prompt_logits

    out = list(ids)
    for _ in range(steps):
        out.append(int(prompt_logits(lm, out)[-1].argmax()))
    return out[len(ids):]


def run(jobs: list[dict], group=None) -> list[dict]:
    from quantrt.eval import prompt_logits
    from quantrt.loader import load

    results = []
    for job in jobs:
        lm = load(job["source"], device="cpu", kernels=job["kernels"], progress=False,
                  tensor_parallel=group)
        results.append({"logits": prompt_logits(lm, job["prompt"]).cpu(),
                        "greedy": greedy(lm, job["prompt"], job["steps"])})
    return results


def main() -> None:
    from quantrt.parallel.executor import LoadSpec, join_group

    rank, size, port = (int(a) for a in sys.argv[1:4])
    out, jobs = sys.argv[4], json.loads(open(sys.argv[5]).read())
    group = join_group(LoadSpec("", None, "cpu", None, "auto"), rank, size, port)
    results = run(jobs, group)
    if rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
