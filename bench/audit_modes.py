#!/usr/bin/env python
"""What strict audit durability costs: seekgate's requests/s in `batched` vs `strict` mode, same run.

What it does
    Builds the tiny DeepSeek-V3 checkpoint in a temp dir (or uses --checkpoint), starts
    the real `tritonserver` on free loopback ports, then for each round and each mode
    starts `python -m proxy serve` (a separate process, as deployed) with
    `audit.durability` set to that mode, issues a key into its data dir, warms up, and
    runs --concurrency aiohttp workers that send
    `POST /v2/models/deepseek/generate {"max_tokens": 1}` back to back for --duration
    seconds. max_tokens 1 keeps the model cheap, so seekgate's own cost shows.

What it prints
    One row per mode (the median of the rounds): requests/s, p50 / p99 latency, audit
    records on disk, and strict's requests/s relative to batched.

Usage
    python bench/audit_modes.py [--duration 5] [--concurrency 16] [--rounds 1] [--checkpoint DIR]

A benchmark, not a test: it asserts nothing (exit 1 only if requests fail).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.model_throughput import percentile  # noqa: E402
from proxy.local.triton import free_ports  # noqa: E402

MODES = ("batched", "strict")


def issue_key(data_dir: Path) -> str:
    """A user key straight into the store, as `seekgate keys create` would."""
    from proxy.keys.format import generate_key, key_prefix_and_last4
    from proxy.keys.hashing import hash_secret, pepper_version
    from proxy.keys.secrets_setup import load_pepper_sync
    from proxy.paths import store_path
    from proxy.settings import load_settings
    from proxy.store import KeyRecord
    from proxy.store.sqlite import SqliteStore

    data_dir.mkdir(parents=True, exist_ok=True)
    pepper = load_pepper_sync(load_settings(None, env={}, overrides={"data_dir": str(data_dir)}))

    async def go() -> str:
        key_id, token = generate_key()
        prefix, last4 = key_prefix_and_last4(token)
        rec = KeyRecord(key_id=key_id, secret_hash=hash_secret(pepper, token), pepper_version=pepper_version(pepper),
                        tier="user", owner="bench", roles=("user",), prefix=prefix, last4=last4,
                        created_at=time.time(), expires_at=None)
        store = await SqliteStore.open(store_path(data_dir))
        try:
            await store.create_key(rec)
        finally:
            await store.close()
        return token
    return asyncio.run(go())


def start_seekgate(root: Path, triton_http: str, triton_grpc: str, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    http, grpc_, metrics = free_ports(3)
    config = root / "seekgate.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(root / "data"),
        "server": {"http_port": http, "grpc_port": grpc_, "metrics_port": metrics},
        "upstream": {"http_url": triton_http, "grpc_target": triton_grpc},
        "policy": {"directory": str(REPO / "policies")},
        "audit": {"durability": mode},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/v2/health/live", timeout=1)
            return proc, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("seekgate did not start")


async def closed_loop(url: str, key: str, concurrency: int, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker(w: int) -> None:
            nonlocal errors
            seq = 0
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                async with session.post(url + "/v2/models/deepseek/generate", headers=headers,
                                        json={"text_input": f"audit bench {w}.{seq % 10}", "max_tokens": 1}) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1
                seq += 1

        end = time.perf_counter() + 1.0   # warm-up: connections, key cache, the batcher
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        latencies.clear()
        started = time.perf_counter()
        end = started + duration
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50_ms": (percentile(latencies, 50) or 0) * 1000,
            "p99_ms": (percentile(latencies, 99) or 0) * 1000, "errors": errors, "n": len(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per mode and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the modes this many times")
    parser.add_argument("--checkpoint", type=Path, help="HF checkpoint dir (default: build the tiny one)")
    args = parser.parse_args()

    from proxy.local.tinymodel import build_tiny_checkpoint
    from proxy.local.triton import TritonLaunch, TritonProcess

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="seekgate-audit-bench-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        checkpoint = args.checkpoint or build_tiny_checkpoint(tmp / "deepseek-tiny", seed=0)
        http, grpc_, metrics = free_ports(3)
        launch = TritonLaunch(REPO / "triton_models", tmp / "triton", checkpoint, http_port=http,
                              grpc_port=grpc_, metrics_port=metrics, config_name="default", startup_timeout_s=180)
        print(f"starting tritonserver on 127.0.0.1:{http} ...", file=sys.stderr, flush=True)
        triton = stack.enter_context(TritonProcess(launch))
        for rnd in range(args.rounds):
            for mode in MODES:
                root = tmp / f"{mode}-{rnd}"
                root.mkdir()
                key = issue_key(root / "data")
                proc, url = start_seekgate(root, triton.http_url, f"127.0.0.1:{grpc_}", mode)
                try:
                    result = asyncio.run(closed_loop(url, key, args.concurrency, args.duration))
                finally:
                    proc.terminate()
                    proc.wait(60)
                audit_file = root / "data" / "audit" / "audit.jsonl"
                result["records"] = sum(1 for _ in audit_file.open()) if audit_file.exists() else 0
                runs[mode].append(result)
                print(f"round {rnd + 1} {mode}: {result['rps']:.1f} req/s", file=sys.stderr, flush=True)

    print(f"\nseekgate -> real Triton, generate max_tokens 1, concurrency {args.concurrency}, "
          f"{args.duration:g}s per mode x {args.rounds} round(s) (median shown)")
    print(f"{'mode':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'records':>8} {'vs batched':>11}")
    base = statistics.median(r["rps"] for r in runs["batched"])
    for mode in MODES:
        rows = runs[mode]
        rps = statistics.median(r["rps"] for r in rows)
        print(f"{mode:<8} {rps:>8.1f} {statistics.median(r['p50_ms'] for r in rows):>8.2f} "
              f"{statistics.median(r['p99_ms'] for r in rows):>8.2f} {rows[-1]['records']:>8d} "
              f"{rps / base:>10.2f}x")
    return 1 if any(r["errors"] for rows in runs.values() for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
