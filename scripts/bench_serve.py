"""Benchmark ``quantrt serve``: request throughput, time to first token (TTFT) and time per
output token (TPOT) percentiles at several client concurrencies; prints a markdown table.

    python scripts/bench_serve.py                                  # starts `quantrt serve demo`
    python scripts/bench_serve.py --source org/model --server-args "--max-num-seqs 256"
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --model NAME   # a running server

Each request is a streaming chat completion of exactly --max-tokens tokens (ignore_eos), so
every level does the same work.  The client is a bare asyncio HTTP/1.1 reader (no client
library parsing every chunk), so at high concurrency it measures the server, not itself.
TTFT: request sent -> first chunk with text; TPOT: (last token - first token) / (tokens - 1),
per request; throughput: requests (and output tokens) / wall time of the level.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

TOPICS = ["rivers", "chess openings", "sourdough bread", "volcanoes", "owls", "night trains",
          "green tea", "glass blowing", "lighthouses", "honey bees", "comets", "jazz chords",
          "paper folding", "glaciers", "typewriters", "coral reefs"]


def _prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} "
                                         f"for reader number {i}."}]


async def _one(host: str, port: int, path: str, body: dict, key: str | None) -> dict:
    """One streaming request over a fresh connection; timings of its chunks."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n"
            + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n").encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + payload)
    await writer.drain()
    status = (await reader.readline()).decode()
    if " 200 " not in status:
        rest = await reader.read()
        raise RuntimeError(f"{status.strip()}: {rest[-300:].decode(errors='replace')}")
    while (await reader.readline()) not in (b"\r\n", b""):     # headers
        pass
    first = last = None
    tokens, buf = 0, b""
    while True:                                               # chunked transfer encoding
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        buf += await reader.readexactly(size)
        await reader.readexactly(2)
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                continue
            msg = json.loads(data)
            if "error" in msg:
                raise RuntimeError(msg["error"]["message"])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            if msg["choices"] and msg["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    writer.close()
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "e2e": end - t0, "tokens": tokens,
            "tpot": (last - first) / (tokens - 1) if first and tokens > 1 else None}


async def _level(url: str, model: str, key: str | None, concurrency: int, num: int,
                 max_tokens: int) -> dict:
    u = urllib.parse.urlparse(url)
    sem = asyncio.Semaphore(concurrency)

    async def run(i: int) -> dict:
        async with sem:
            return await _one(u.hostname, u.port, "/v1/chat/completions", {
                "model": model, "messages": _prompt(i), "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}, key)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(run(i) for i in range(num)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": num, "wall_s": wall,
            "req_per_s": num / wall, "tok_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft": [r["ttft"] for r in results],
            "tpot": [r["tpot"] for r in results if r["tpot"] is not None],
            "e2e": [r["e2e"] for r in results]}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def table(levels: list[dict]) -> str:
    rows = [("| concurrency | requests | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) | "
             "TPOT p50 / p90 / p99 (ms) | latency p50 (s) |"),
            "|---|---|---|---|---|---|---|"]
    for lv in levels:
        ttft = " / ".join(f"{_pct(lv['ttft'], q) * 1e3:.0f}" for q in (50, 90, 99))
        tpot = " / ".join(f"{_pct(lv['tpot'], q) * 1e3:.1f}" for q in (50, 90, 99))
        rows.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['req_per_s']:.2f} | "
                    f"{lv['tok_per_s']:.1f} | {ttft} | {tpot} | {_pct(lv['e2e'], 50):.2f} |")
    return "\n".join(rows)


def _start_server(source: str, extra: list[str], key: str | None) -> tuple[subprocess.Popen, str]:
    fd, log = tempfile.mkstemp(prefix="bench_serve_", suffix=".log")
    cmd = [sys.executable, "-m", "quantrt.cli", "serve", source, "--port", "0",
           "--uvicorn-log-level", "warning", *extra] + (["--api-key", key] if key else [])
    with os.fdopen(fd, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with open(log) as f:
            text = f.read()
        m = re.search(r"serving '.*' at (http://[\d.]+:\d+)/v1", text)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}):\n{text}")
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"the server did not start; log: {log}")


def _served_model(url: str, key: str | None) -> str:
    req = urllib.request.Request(url + "/v1/models",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["data"][0]["id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="demo", help="model to serve (ignored with --url)")
    ap.add_argument("--server-args", default="", help="extra `quantrt serve` arguments")
    ap.add_argument("--url", default=None, help="benchmark a running server instead")
    ap.add_argument("--model", default=None, help="model name (default: the server's first)")
    ap.add_argument("--api-key", default=os.environ.get("QUANTRT_API_KEY"))
    ap.add_argument("--concurrency", default="1,4,16",
                    help="comma-separated client concurrencies")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level (default: max(8, 2 x concurrency))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    proc = None
    url = args.url
    if url is None:
        proc, url = _start_server(args.source, shlex.split(args.server_args), args.api_key)
    try:
        model = args.model or _served_model(url, args.api_key)
        # Warm-up: first-call costs (kernel choice, allocator growth) are not measured.
        asyncio.run(_level(url, model, args.api_key, 2, 2, 8))
        results = []
        for c in levels:
            num = args.requests or max(8, 2 * c)
            results.append(asyncio.run(_level(url, model, args.api_key, c, num, args.max_tokens)))
            print(f"concurrency {c}: {results[-1]['req_per_s']:.2f} req/s", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"model {model}, {args.max_tokens} output tokens per request (ignore_eos), "
          "streaming chat completions\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "max_tokens": args.max_tokens, "levels": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
