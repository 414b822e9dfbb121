#!/usr/bin/env python
"""Streamed chat through seekgate's /v1 (OpenAI API) against Triton's generate_stream direct, side by side.

What it does
    Builds the tiny DeepSeek checkpoint, starts the real tritonserver on triton_models/ (deepseek and
    its decoupled twin deepseek_stream) and seekgate (`serve`, one process) in front of it, then for each
    concurrency level N runs N asyncio clients back to back for --duration seconds, twice in the same run:
    - direct: POST /v2/models/deepseek_stream/generate_stream to Triton (text_input, max_tokens);
    - openai: POST /v1/chat/completions with stream=true through seekgate (key, policy, limits, audit,
      the chat template rendered by the model, SSE re-shaped to chat.completion.chunk);
    - litellm (with --litellm PATH): the same request to LiteLLM's proxy, its `triton` provider pointed
      at the same Triton's generate_stream (bench/litellm_proxy.py; LiteLLM in a venv of its own).

What it prints (and writes with --json)
    Per level and path: streams/s, output tokens/s, time to first token p50/p99 (first content chunk /
    first event), and the TTFT seekgate adds (openai p50 - direct p50). Same machine, same run.

Usage
    python bench/openai_stream.py [--concurrency 1,32] [--duration 10] [--max-tokens 32] [--json out.json]
                                  [--litellm /path/to/venv/bin/litellm]

A benchmark, not a test: it asserts nothing (exit 1 only if streams fail).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.litellm_proxy import MASTER_KEY, start_litellm  # noqa: E402
from bench.stack import create_key, seekgate_config, start_seekgate, upstream_of, wait_live  # noqa: E402
from proxy.local.tinymodel import build_tiny_checkpoint  # noqa: E402
from proxy.local.triton import TritonLaunch, TritonProcess, free_ports  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["Hello", "Tell me about batching", "The quick brown fox", "Inference servers"]


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
                     openai: bool) -> tuple[float, int]:
    """(seconds to the first content, output tokens) of one streamed answer."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with session.post(url, json=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            doc = json.loads(line[6:])
            if openai:
                if doc.get("usage"):
                    tokens = doc["usage"]["completion_tokens"]
                text = (doc["choices"][0]["delta"].get("content") if doc.get("choices") else None)
            else:
                tokens = doc.get("output_tokens", tokens)
                text = doc.get("text_output")
            if text and first is None:
                first = time.perf_counter() - started
    return (first if first is not None else time.perf_counter() - started), tokens


async def level(url: str, headers: dict[str, str], openai: bool, concurrency: int, duration: float,
                max_tokens: int, name: str | None = None) -> dict[str, Any]:
    ttfts: list[float] = []
    tokens = errors = 0
    deadline = time.perf_counter() + duration

    async def worker(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal tokens, errors
        n = 0
        while time.perf_counter() < deadline:
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            n += 1
            body: dict[str, Any] = (
                {"model": "deepseek", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                 "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                if openai else {"text_input": prompt, "max_tokens": max_tokens, "temperature": 0})
            try:
                ttft, got = await one_stream(session, url, body, headers, openai)
            except Exception as exc:
                errors += 1
                if errors == 1:
                    print(f"{name or url}: first error: {str(exc)[:300]}", file=sys.stderr)
                continue
            ttfts.append(ttft)
            tokens += got

    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(i, session) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    ttfts.sort()
    return {"path": name or ("openai /v1" if openai else "triton direct"), "concurrency": concurrency,
            "streams": len(ttfts), "errors": errors, "streams_per_s": len(ttfts) / seconds,
            "tokens_per_s": tokens / seconds,
            "ttft_p50_ms": statistics.median(ttfts) * 1000 if ttfts else None,
            "ttft_p99_ms": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000 if ttfts else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", type=Path)
    p.add_argument("--litellm", type=Path, help="the litellm command of a separate venv: adds LiteLLM's proxy")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="seekgate-openai-bench-") as tmp:
        root = Path(tmp)
        checkpoint = build_tiny_checkpoint(root / "ckpt")
        http, grpc_, metrics = free_ports(3)
        triton = TritonProcess(TritonLaunch(REPO / "triton_models", root / "triton-data", checkpoint, http_port=http,
                                            grpc_port=grpc_, metrics_port=metrics, config_name="default",
                                            startup_timeout_s=180)).__enter__()
        seekgate = litellm = None
        try:
            config = seekgate_config(root, upstream_of(triton))
            key = create_key(config)
            seekgate = start_seekgate(config)
            wait_live(seekgate)
            direct_url = triton.http_url + "/v2/models/deepseek_stream/generate_stream"
            openai_url = seekgate.url + "/v1/chat/completions"
            auth = {"Authorization": f"Bearer {key}"}
            asyncio.run(level(openai_url, auth, True, 2, 2.0, args.max_tokens))   # warm-up: both paths, all shapes
            asyncio.run(level(direct_url, {}, False, 2, 2.0, args.max_tokens))
            if args.litellm is not None:
                litellm = start_litellm(args.litellm, triton.http_url, root)
                litellm_url = litellm.url + "/v1/chat/completions"
                litellm_auth = {"Authorization": f"Bearer {MASTER_KEY}"}
                asyncio.run(level(litellm_url, litellm_auth, True, 2, 2.0, args.max_tokens, "litellm"))
            rows = []
            for c in levels:   # alternating, so drift on a shared machine hits every path alike
                rows.append(asyncio.run(level(direct_url, {}, False, c, args.duration, args.max_tokens)))
                rows.append(asyncio.run(level(openai_url, auth, True, c, args.duration, args.max_tokens)))
                if litellm is not None:
                    rows.append(asyncio.run(level(litellm_url, litellm_auth, True, c, args.duration,
                                                  args.max_tokens, "litellm")))
        finally:
            if litellm is not None:
                litellm.stop()
            if seekgate is not None:
                seekgate.stop()
            triton.stop()
    print(f"{'path':<14} {'c':>3} {'streams/s':>10} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'errors':>6}")
    for r in rows:
        print(f"{r['path']:<14} {r['concurrency']:>3} {r['streams_per_s']:>10.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['ttft_p50_ms'] or 0:>8.1f}ms {r['ttft_p99_ms'] or 0:>8.1f}ms {r['errors']:>6}")
    per_level = 3 if args.litellm is not None else 2
    for i in range(0, len(rows), per_level):
        direct = rows[i]
        for via in rows[i + 1:i + per_level]:
            if direct["ttft_p50_ms"] and via["ttft_p50_ms"]:
                print(f"c{direct['concurrency']}: {via['path']} adds {via['ttft_p50_ms'] - direct['ttft_p50_ms']:.1f} ms "
                      f"TTFT (p50), tokens/s {via['tokens_per_s'] / max(direct['tokens_per_s'], 1e-9):.2f}x of direct")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
