#!/usr/bin/env python
"""Closed-loop throughput benchmark of the `deepseek` model on the real Triton server.

What it does
    Builds the tiny random-weight DeepSeek-V3 checkpoint in a temp dir (or uses
    --checkpoint), starts the real `tritonserver` on free loopback ports with the
    CPU config (config.pbtxt, dynamic batching, max_batch_size 32) -- or talks to
    an already running Triton with --url -- warms it up, then for each
    concurrency level N runs N asyncio workers that each send
    `POST /v2/models/deepseek/generate` requests back to back for --duration
    seconds. Every request carries the same field set (text_input, max_tokens)
    so Triton's dynamic batcher may put them in one batch; prompts vary a little
    per request from a fixed set.

What it prints (and writes with --json)
    One row per level: concurrency, requests/s, output tokens/s, p50 / p99
    latency (ms), the speed-up over concurrency 1 (requests/s ratio), and
    Triton's own stats delta for the level from /v2/models/deepseek/stats:
    inference_count / execution_count = average batch size the batcher formed.

Target
    At least 8x requests/s at concurrency 32 over concurrency 1 on a 2-core CPU
    (the benefit of batching 32 decodes into one padded forward pass per step).

Usage
    python bench/model_throughput.py [--concurrency 1,8,32] [--duration 10]
        [--max-tokens 16] [--json out.json] [--checkpoint DIR | --url URL]

This is a benchmark, not a test: it asserts nothing and exits 0 whether or not
the target is met (exit 1 only if requests fail).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "deepseek"
TARGET_SPEEDUP = 8.0
TARGET_CONCURRENCY = 32
TARGET_LINE = (f"target: >= {TARGET_SPEEDUP:.0f}x requests/s at concurrency {TARGET_CONCURRENCY} "
               f"over concurrency 1 on a 2-core CPU")

# Fixed prompt set; each request appends its own small suffix so prompts vary a little.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Inference servers batch requests to keep the accelerator busy.",
    "seekgate checks every key before a request reaches Triton.",
    "DeepSeek is a mixture-of-experts language model with latent attention.",
    "Banks, hospitals and factories keep their data inside the building.",
    "Hello world! Count with me: 0123456789.",
    "Summarise the audit log of the last hour in one line.",
    "Which experts are routed for this token, and why?",
]


def prompt_for(worker: int, seq: int) -> str:
    return f"{PROMPTS[(worker + seq) % len(PROMPTS)]} #{worker}.{seq % 10}"


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


async def model_stats(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(f"{url}/v2/models/{MODEL}/stats") as r:
        r.raise_for_status()
        body = await r.json()
    entry = body["model_stats"][0]
    return {"inference_count": int(entry.get("inference_count", 0)),
            "execution_count": int(entry.get("execution_count", 0))}


async def generate(session: aiohttp.ClientSession, url: str, text: str, max_tokens: int) -> dict[str, Any]:
    payload = {"text_input": text, "max_tokens": max_tokens}
    async with session.post(f"{url}/v2/models/{MODEL}/generate", json=payload) as r:
        body = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {body}")
        return body


async def run_level(session: aiohttp.ClientSession, url: str, concurrency: int,
                    duration: float, max_tokens: int) -> dict[str, Any]:
    before = await model_stats(session, url)
    latencies: list[float] = []
    out_tokens = 0
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + duration

    async def worker(w: int) -> None:
        nonlocal out_tokens
        seq = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                body = await generate(session, url, prompt_for(w, seq), max_tokens)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(str(exc)[:200])
                seq += 1
                continue
            latencies.append(time.perf_counter() - t0)
            out_tokens += int(body.get("output_tokens", 0))
            seq += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    # Closed loop: requests in flight at the deadline finish; the window includes them.
    elapsed = time.perf_counter() - start
    after = await model_stats(session, url)
    lat = sorted(latencies)
    inf = after["inference_count"] - before["inference_count"]
    exe = after["execution_count"] - before["execution_count"]
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": len(lat) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "p50_ms": _ms(percentile(lat, 50)),
        "p99_ms": _ms(percentile(lat, 99)),
        "triton_inference_count": inf,
        "triton_execution_count": exe,
        "avg_batch_size": (inf / exe) if exe else None,
    }


async def bench(url: str, levels: list[int], duration: float, max_tokens: int, warmup_s: float) -> list[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=max(levels) + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # Warm-up: one lone request, then a short burst at the highest level so the
        # batched code path (padding, larger tensors) has been exercised too.
        await generate(session, url, PROMPTS[0], max_tokens)
        if warmup_s > 0:
            await run_level(session, url, max(levels), warmup_s, max_tokens)
        results = []
        for n in levels:
            print(f"  running concurrency {n} for {duration:g}s ...", file=sys.stderr, flush=True)
            results.append(await run_level(session, url, n, duration, max_tokens))
    base = next((r["requests_per_s"] for r in results if r["concurrency"] == 1), None)
    for r in results:
        r["speedup_vs_c1"] = (r["requests_per_s"] / base) if base else None
    return results


def fmt_table(results: list[dict[str, Any]]) -> str:
    header = (f"{'conc':>5} {'req/s':>8} {'out tok/s':>10} {'p50 ms':>9} {'p99 ms':>9} "
              f"{'speedup':>8} {'reqs':>6} {'err':>4} {'tr.infer':>9} {'tr.exec':>8} {'avg batch':>10}")
    lines = [header, "-" * len(header)]
    for r in results:
        sp = f"{r['speedup_vs_c1']:.2f}x" if r["speedup_vs_c1"] is not None else "n/a"
        lines.append(
            f"{r['concurrency']:>5} {r['requests_per_s']:>8.2f} {r['output_tokens_per_s']:>10.1f} "
            f"{_num(r['p50_ms'], '.1f'):>9} {_num(r['p99_ms'], '.1f'):>9} {sp:>8} {r['requests']:>6} {r['errors']:>4} "
            f"{r['triton_inference_count']:>9} {r['triton_execution_count']:>8} {_num(r['avg_batch_size'], '.2f'):>10}")
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> str:
    row = next((r for r in results if r["concurrency"] == TARGET_CONCURRENCY), None)
    if row is None or row["speedup_vs_c1"] is None:
        return f"{TARGET_LINE}: not measured (need concurrency 1 and {TARGET_CONCURRENCY} in --concurrency)"
    ok = row["speedup_vs_c1"] >= TARGET_SPEEDUP
    return f"{TARGET_LINE}: {'MET' if ok else 'NOT MET'} ({row['speedup_vs_c1']:.2f}x)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default 1,8,32)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request (default 16)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load (default 3)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of building the tiny one")
    src.add_argument("--url", help="use an already running Triton at this URL (e.g. http://127.0.0.1:8000)")
    p.add_argument("--model-repository", type=Path, default=REPO / "triton_models")
    args = p.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error("--concurrency takes comma-separated integers, e.g. 1,8,32")
    if not args.levels or min(args.levels) < 1:
        p.error("--concurrency levels must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(TARGET_LINE, flush=True)
    with ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
            checkpoint_desc = "(external Triton)"
        else:
            from proxy.local.triton import TritonLaunch, TritonProcess, free_ports

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="seekgate-bench-")))
            if args.checkpoint:
                checkpoint = args.checkpoint
            else:
                from proxy.local.tinymodel import build_tiny_checkpoint

                print("building tiny checkpoint ...", file=sys.stderr, flush=True)
                checkpoint = build_tiny_checkpoint(tmp / "deepseek-tiny", seed=0)
            checkpoint_desc = str(checkpoint)
            http, grpc_, metrics = free_ports(3)
            launch = TritonLaunch(args.model_repository, tmp / "data", checkpoint, http_port=http,
                                  grpc_port=grpc_, metrics_port=metrics, config_name="default",
                                  startup_timeout_s=180)
            print(f"starting tritonserver on 127.0.0.1:{http} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            triton = stack.enter_context(TritonProcess(launch))
            print(f"triton ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
            url = triton.http_url
        results = asyncio.run(bench(url, args.levels, args.duration, args.max_tokens, args.warmup))

    print(f"\nmodel {MODEL} @ {url}, checkpoint {checkpoint_desc}, duration {args.duration:g}s/level, "
          f"max_tokens {args.max_tokens}")
    print(fmt_table(results))
    print("avg batch = Triton inference_count / execution_count over the level (from /v2/models/deepseek/stats)")
    print(verdict(results))
    if args.json:
        doc = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count()},
            "url": url, "checkpoint": checkpoint_desc, "model": MODEL,
            "duration_s": args.duration, "max_tokens": args.max_tokens, "concurrency": args.levels,
            "target": {"speedup": TARGET_SPEEDUP, "concurrency": TARGET_CONCURRENCY, "text": TARGET_LINE},
            "verdict": verdict(results),
            "results": results,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
