"""Benchmark: Triton paged decode attention against torch SDPA on contiguous KV (issue 5).

Llama-3-8B attention shape (32 query heads, 8 KV heads, head dim 128), fp16, block size 16,
block tables shuffled over the cache (as the block manager hands them out).  Per (batch,
context) case: correctness against the torch reference (``paged_attention_ref``), then the
median time of one layer's call under CUDA-graph replay, for each tokens-per-tile choice,
and ``F.scaled_dot_product_attention`` (one query per sequence, ``enable_gqa``) on the same
KV laid out contiguously, [B, Hk, ctx, D] -- a baseline that needs no block table; plus
achieved KV-read bandwidth as a fraction of the measured device copy bandwidth.

    PYTHONPATH=. python scripts/bench_decode_attention.py --out DIR [--tiles 32,64,128]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wq_graphs import graph_time_us  # noqa: E402
from quant_kernels import paged_attention as pa  # noqa: E402
from quantrt.models.attention import AttentionMetadata, paged_attention_ref  # noqa: E402

CASES = [(1, 512), (1, 4096), (1, 16384), (16, 2048), (64, 1024), (256, 650), (256, 2048)]
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
TOL = 2e-2  # absolute, fp16 inputs, outputs ~N(0, 1) (tests/test_paged_attention.py)


def copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)])
    return 2 * src.numel() / us / 1e3


def make_case(batch: int, ctx: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = -(-ctx // BLOCK)
    nb = batch * blocks + 1
    k = torch.randn(nb, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", generator=g,
                    dtype=torch.float16)
    v = torch.randn_like(k)
    tables = torch.randperm(nb, device="cuda", generator=g)[:batch * blocks]
    tables = tables.reshape(batch, blocks).int()
    # lengths spread over [ctx/2, ctx] so the masks and uneven splits are exercised
    lens = torch.randint(ctx // 2 + 1, ctx + 1, (batch,), device="cuda", generator=g)
    lens[0] = ctx
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", generator=g, dtype=torch.float16)
    return q, k, v, tables, lens.int()


def check(q, k, v, tables, lens, tile: int) -> float:
    scale = HEAD_DIM ** -0.5
    got = pa.paged_decode_attention(q, k, v, tables, lens, scale, tokens_per_tile=tile)
    lens_host = lens.tolist()
    rows = list(range(min(q.shape[0], 8)))  # the reference loops over sequences: a subset
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(rows), dtype=torch.int64), block_tables=tables[rows].cpu(),
        context_lens=lens[rows].cpu(), query_start_loc=torch.arange(len(rows) + 1,
                                                                    dtype=torch.int32),
        context_lens_host=[lens_host[r] for r in rows], query_lens_host=[1] * len(rows))
    want = paged_attention_ref(q[rows].float().cpu(), k.float().cpu(), v.float().cpu(), meta,
                               scale, None)
    return (got[rows].float().cpu() - want).abs().max().item()


def dense_kv(k, v, tables, ctx: int):
    """[B, Hk, ctx, D] copies of each sequence's pages (positions past its length unused)."""
    b = tables.shape[0]
    kd = k[tables.long()].reshape(b, -1, KV_HEADS, HEAD_DIM)[:, :ctx].transpose(1, 2)
    vd = v[tables.long()].reshape(b, -1, KV_HEADS, HEAD_DIM)[:, :ctx].transpose(1, 2)
    return kd.contiguous(), vd.contiguous()


def run_case(batch: int, ctx: int, tiles: list[int], bw: float) -> dict:
    q, k, v, tables, lens = make_case(batch, ctx)
    scale = HEAD_DIM ** -0.5
    kv_bytes = 2 * lens.sum().item() * KV_HEADS * HEAD_DIM * 2
    row = dict(batch=batch, ctx=ctx, kv_MB=round(kv_bytes / 1e6, 1))
    for tile in tiles:
        err = check(q, k, v, tables, lens, tile)
        splits = pa.pick_splits(batch, KV_HEADS, tables.shape[1] * BLOCK, q.device, tile)
        us = graph_time_us([lambda t=tile: pa.paged_decode_attention(
            q, k, v, tables, lens, scale, tokens_per_tile=t)])
        row[f"tile{tile}"] = dict(us=round(us, 1), splits=splits, err=err,
                                  bw_frac=round(kv_bytes / us / 1e3 / bw, 3))
    kd, vd = dense_kv(k, v, tables, ctx)
    mask = torch.arange(ctx, device="cuda")[None, :] < lens[:, None]
    mask = mask[:, None, None, :]
    qd = q[:, :, None, :]
    row["sdpa_us"] = round(graph_time_us([lambda: F.scaled_dot_product_attention(
        qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)]), 1)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--tiles", default="32,64,128", help="tokens per tile to compare")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode_attention: needs a CUDA GPU")
    tiles = [int(t) for t in args.tiles.split(",")]
    bw = copy_gbps()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy {bw:.0f} GB/s; "
          f"H={HEADS} Hk={KV_HEADS} D={HEAD_DIM} block {BLOCK}, fp16, CUDA-graph medians\n")
    head = " | ".join(f"tile {t} us (splits, % copy BW)" for t in tiles)
    print(f"| batch | ctx | KV MB | {head} | SDPA dense us | best vs SDPA | max err |")
    print("|" + "---|" * (6 + len(tiles)))
    rows, bad = [], 0
    for batch, ctx in CASES:
        r = run_case(batch, ctx, tiles, bw)
        rows.append(r)
        cells = " | ".join(f"{r[f'tile{t}']['us']} ({r[f'tile{t}']['splits']}, "
                           f"{100 * r[f'tile{t}']['bw_frac']:.0f}%)" for t in tiles)
        best = min(r[f"tile{t}"]["us"] for t in tiles)
        err = max(r[f"tile{t}"]["err"] for t in tiles)
        bad += err > TOL
        print(f"| {batch} | {ctx} | {r['kv_MB']} | {cells} | {r['sdpa_us']} | "
              f"{r['sdpa_us'] / best:.2f}x | {err:.1e}{' WRONG' if err > TOL else ''} |",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_attention.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, copy_GBps=bw,
        default_tile=pa.TOKENS_PER_TILE, rows=rows), indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
