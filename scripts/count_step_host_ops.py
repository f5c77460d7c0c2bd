"""Host-side work of the model runner per engine step, counted on the CPU.

Timing the runner's overhead needs the GPU; what it costs there can be counted anywhere:
every tensor op outside the model's forward is a kernel launch (or an allocation) on CUDA,
every tensor made from host data (``torch.tensor(list, device=...)``, ``torch.frombuffer``,
indexing with a Python list) is a host-to-device copy, and every ``.tolist()`` /
``.item()`` waits for the GPU.  This runs the engine on a tiny random Llama (CPU) through
prefill-only, mixed and decode-only steps and prints the counts per step kind, outside the
model forward and logits (the runner's input building, row selection and the sampler).
View-only ops (slices, reshapes, no-op dtype casts) are not counted as ops.

``--time``: instead, the host time of building a step's device inputs (``_inputs`` +
``_tensors``, best of 30) for a decode step of 256 sequences (prompts 128-1024 tokens, 200
outputs each, block size 16) and a 2048-token prefill step of 4 prompts.

    PYTHONPATH=. python scripts/count_step_host_ops.py [--prompts 16] [--batch 48] [--time]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Counts(TorchDispatchMode):
    """aten ops, tensor-from-list builds and device-to-host reads while ``on``."""

    def __init__(self) -> None:
        super().__init__()
        self.on = True
        self.c: Counter = Counter()

    # ops that only make a new view of existing memory (or do nothing), no kernel on CUDA
    FREE = {"slice", "view", "detach", "detach_", "alias", "lift_fresh", "resolve_conj",
            "resolve_neg", "select", "unsqueeze", "squeeze", "t", "transpose", "expand",
            "as_strided", "_unsafe_view"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on:
            name = func.__name__.split(".")[0]
            free = name in self.FREE or (name in ("to", "_to_copy") and out is args[0])
            self.c["ops"] += not free
            self.c["host_tensors"] += name == "lift_fresh"
            self.c["op:" + func.__name__] += 1
        return out


def time_inputs() -> None:
    import random
    import time

    from quantrt.engine.block_manager import BlockManager
    from quantrt.engine.model_runner import ModelRunner
    from quantrt.engine.sequence import SamplingParams, Sequence

    rng = random.Random(0)
    blocks = BlockManager(256 * 80, 16, enable_prefix_caching=False)
    runner = ModelRunner.__new__(ModelRunner)  # no model or cache: input building only
    runner.device, runner.block_size = torch.device("cpu"), 16
    decode, prefill = [], []
    for _ in range(256):
        seq = Sequence([rng.randrange(300) for _ in range(rng.randint(128, 1024))],
                       SamplingParams())
        seq.output_ids = [rng.randrange(300) for _ in range(200)]
        blocks.grow(seq, len(seq))
        seq.num_cached = len(seq) - 1
        decode.append((seq, 1))
    for n in (512, 700, 600, 236):
        seq = Sequence([rng.randrange(300) for _ in range(n)], SamplingParams())
        blocks.grow(seq, n)
        prefill.append((seq, n))
    for name, batch in (("decode, 256 sequences", decode), ("prefill, 2048 tokens", prefill)):
        rows, end = [], 0
        for _, n in batch:
            end += n
            rows.append(end - 1)
        best = float("inf")
        for _ in range(30):
            t = time.perf_counter()
            runner._tensors(runner._inputs(batch, blocks, rows))
            best = min(best, time.perf_counter() - t)
        print(f"{name}: {best * 1e3:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=48, help="max_num_batched_tokens")
    ap.add_argument("--ops", action="store_true", help="print each step's ops by name")
    ap.add_argument("--time", action="store_true", help="time input building instead")
    args = ap.parse_args()
    if args.time:
        return time_inputs()
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.engine.sequence import SamplingParams
    from quantrt.loader import load
    from tests.tiny_models import make_tiny_model

    model_dir = make_tiny_model(Path(tempfile.mkdtemp()) / "m", "llama")
    eng = LLMEngine(load(model_dir, device="cpu", progress=False),
                    EngineConfig(kv_cache_memory=8 << 20, block_size=16,
                                 max_num_batched_tokens=args.batch))
    counts = Counts()
    model = eng.runner.model
    for name in ("forward", "compute_logits"):  # the model's own ops are not counted
        inner = getattr(model, name)

        def paused(*a, _inner=inner, **kw):
            counts.on = False
            try:
                return _inner(*a, **kw)
            finally:
                counts.on = True
        setattr(model, name, paused)
    real_tolist, real_item, real_frombuffer = torch.Tensor.tolist, torch.Tensor.item, \
        torch.frombuffer

    def frombuffer(*a, **kw):
        counts.c["host_tensors"] += counts.on
        return real_frombuffer(*a, **kw)

    def tolist(self):
        counts.c["syncs"] += counts.on
        return real_tolist(self)

    def item(self):
        counts.c["syncs"] += counts.on
        return real_item(self)

    g = torch.Generator().manual_seed(0)
    for i in range(args.prompts):
        ids = torch.randint(0, 256, (int(torch.randint(5, 60, (1,), generator=g)),),
                            generator=g).tolist()
        eng.add_request(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    per_kind: dict[str, list[Counter]] = defaultdict(list)
    step = eng.runner.step

    def counted_step(batch, blocks):
        kind = ("decode" if all(n == 1 for _, n in batch) else
                "prefill" if all(n > 1 or s.num_cached == 0 for s, n in batch) else "mixed")
        counts.c = Counter()
        torch.Tensor.tolist, torch.Tensor.item, torch.frombuffer = tolist, item, frombuffer
        try:
            with counts:
                out = step(batch, blocks)
        finally:
            torch.Tensor.tolist, torch.Tensor.item, torch.frombuffer = real_tolist, real_item, \
                real_frombuffer
        per_kind[kind].append(counts.c | Counter(seqs=len(batch)))
        if args.ops:
            print(kind, sorted((k[3:], v) for k, v in counts.c.items() if k.startswith("op:")))
        return out
    eng.runner.step = counted_step
    while eng.has_unfinished():
        eng.step()
    print("step kind | steps | mean seqs | ops outside model | host tensors (H2D copies) | "
          "syncs")
    for kind, rows in per_kind.items():
        n = len(rows)
        mean = {k: sum(r[k] for r in rows) / n for k in ("seqs", "ops", "host_tensors", "syncs")}
        print(f"{kind} | {n} | {mean['seqs']:.1f} | {mean['ops']:.1f} | "
              f"{mean['host_tensors']:.1f} | {mean['syncs']:.1f}")


if __name__ == "__main__":
    main()
