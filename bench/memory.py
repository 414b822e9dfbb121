#!/usr/bin/env python
"""Does seekgate's memory stay flat? RSS after 1M requests from 10k distinct keys, against RSS after 100k.

What it does
    Builds seekgate's real application state in this process (`build_app` and its
    cleanup_ctx under an AppRunner: SQLite store, 50-rule policy from bench/policies/,
    key cache, limiter, audit writer, metrics), issues --keys user keys into the store,
    and then drives the protocol-free request path for --requests requests, cycling
    through the keys: `admit` (authenticate, classify, authorize), `audit_ready`, `limit` (every key
    has an rpm limit, so the limiter keeps per-key state) and `finish` (one audit record
    and one metrics observation). Nothing is forwarded: Triton is not needed, and the
    request path's own state is what is measured.

    VmRSS is read after 10% of the requests (100k of the default 1M) and at the end,
    each time once the audit writer has drained its queue, so records waiting to be
    written do not count as growth. The limiter's rpm limit is an exact sliding log: it
    holds every admission of the last 60 s, so memory grows with the request rate for
    the first minute and is flat after; a first reading taken earlier is flagged.

What it prints
    RSS at both points, the growth in percent, the sizes of the bounded structures
    (key cache, policy memo, limiter keys), and issue 7's target: RSS at the end within
    10% of RSS at the 10% mark. Reported, never asserted.

Usage
    python bench/memory.py                              # 1M requests, 10k keys: several minutes
    python bench/memory.py --requests 100000 --keys 2000   # scaled down
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aiohttp import web  # noqa: E402

from bench.stack import BENCH_LABELS, BENCH_MODELS, BENCH_ROLES, POLICY_DIR, run_loop  # noqa: E402
from proxy.context import RequestContext  # noqa: E402
from proxy.frontend.http import build_app  # noqa: E402
from proxy.keys.format import generate_key, key_prefix_and_last4  # noqa: E402
from proxy.keys.hashing import hash_secret  # noqa: E402
from proxy.keys.issue import DEFAULT_EXPIRY_S  # noqa: E402
from proxy.local.triton import free_ports  # noqa: E402
from proxy.settings import load_settings  # noqa: E402
from proxy.steps.app_state import STATE, AppState  # noqa: E402
from proxy.steps.classify import classify_http  # noqa: E402
from proxy.steps.pipeline import admit, audit_ready, finish, limit  # noqa: E402
from proxy.store import KeyRecord  # noqa: E402

PATH = "/v2/models/trivial/infer"
TARGET_GROWTH = 0.10


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def issue_keys(state: AppState, n: int) -> list[str]:
    """n user keys with the bench key's attributes, straight into the store (as `keys create` would)."""
    pepper = state.pepper   # the server's, however it was loaded
    now = time.time()
    tokens = []
    for i in range(n):
        key_id, token = generate_key()
        prefix, last4 = key_prefix_and_last4(token)
        await state.store.create_key(KeyRecord(
            key_id=key_id, secret_hash=hash_secret(pepper, token), tier="user", owner=f"bench-{i}",
            roles=BENCH_ROLES, labels=dict(BENCH_LABELS), models=BENCH_MODELS, prefix=prefix, last4=last4,
            # The user tier's default validity: a fleet whose every key is in the expiry warning window
            # (72 h) would have the periodic expiry checks handle all 10k keys, which no fleet does.
            created_at=now, expires_at=now + DEFAULT_EXPIRY_S["user"]))
        tokens.append(token)
    return tokens


async def one_request(state: AppState, token: str) -> None:
    ctx = RequestContext(request_id=uuid.uuid4().hex, client_ip="127.0.0.1", protocol="http",
                         method="POST", path=PATH)
    try:
        await admit(state, ctx, f"Bearer {token}", lambda: classify_http("POST", PATH))
        await audit_ready(state)   # as the fronts do: over audit.queue_soft_max it waits for the writer
        await limit(state, ctx, lambda: None)
        ctx.http_status, ctx.upstream_ms = 200, 0.1   # as if Triton had answered
    finally:
        finish(state, ctx)
    if ctx.status != "allowed":
        raise RuntimeError(f"request refused: {ctx.http_status} {ctx.reason}")
    # A server's loop runs its other tasks between requests, since every request waits on a socket.
    # Here nothing need suspend once keys and decisions are cached, and without this the audit
    # writer never ran: its queue, and RSS with it, grew with the request rate.
    await asyncio.sleep(0)


async def drained(state: AppState, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while state.audit.queue_depth() > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def sizes(state: AppState) -> dict[str, int]:
    # Private attributes, read only to report how full the bounded structures are.
    limiter_keys = getattr(state.limiter, "_keys", {})
    authz_state = getattr(state.authorizer, "_state", None)
    return {"key_cache": len(state.key_cache) if state.key_cache is not None else 0,
            "policy_memo": len(getattr(authz_state, "cache", {})), "limiter_keys": len(limiter_keys)}


WINDOW_S = 60.0   # the limiter's rpm/tpm sliding log keeps 60 s of admissions (proxy/state/limits.py)


async def run(requests: int, keys: int, checkpoint_at: int, rpm: int = 10 ** 9) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="seekgate-memory-") as tmp:
        http, grpc_, metrics = free_ports(3)
        settings = load_settings(None, env={}, overrides={
            "data_dir": str(Path(tmp) / "data"), "policy.directory": str(POLICY_DIR),
            "server.http_port": http, "server.grpc_port": grpc_, "server.metrics_port": metrics,
            "upstream.http_url": "http://127.0.0.1:9",   # never called: nothing is forwarded
            "limits.user_rpm": rpm,                      # limited, so the limiter keeps state per key
        })
        runner = web.AppRunner(build_app(settings))
        await runner.setup()   # the cleanup_ctx builds the state exactly as `serve` does
        try:
            state = runner.app[STATE]
            t0 = time.perf_counter()
            tokens = await issue_keys(state, keys)
            issued_s = time.perf_counter() - t0
            rss_start = rss_bytes()
            marks: dict[str, Any] = {}
            t0 = time.perf_counter()
            step = max(1, requests // 20)
            for i in range(requests):
                await one_request(state, tokens[i % keys])
                if (i + 1) % step == 0:
                    print(f"  {i + 1} requests, {(i + 1) / (time.perf_counter() - t0):.0f} req/s", file=sys.stderr,
                          flush=True)
                if i + 1 in (checkpoint_at, requests):
                    await drained(state)
                    marks[str(i + 1)] = {"rss": rss_bytes(), "seconds": round(time.perf_counter() - t0, 1),
                                         **sizes(state)}
                    print(f"  {i + 1} requests: RSS {marks[str(i + 1)]['rss'] / 2**20:.1f} MiB", file=sys.stderr,
                          flush=True)
            elapsed = time.perf_counter() - t0
        finally:
            await runner.cleanup()
    first, last = marks[str(checkpoint_at)], marks[str(requests)]
    growth = (last["rss"] - first["rss"]) / first["rss"]
    return {"requests": requests, "keys": keys, "checkpoint_at": checkpoint_at, "user_rpm": rpm,
            "keys_issued_s": round(issued_s, 1),
            # Before the window has filled, the first reading misses 60 s of rpm log entries by design.
            "first_mark_before_window_filled": rpm > 0 and first["seconds"] < WINDOW_S,
            "rss_before_requests": rss_start, "marks": marks, "growth": round(growth, 4),
            "requests_per_s": round(requests / elapsed), "target": f"growth <= {TARGET_GROWTH:.0%}",
            "verdict": "MET" if growth <= TARGET_GROWTH else "NOT MET"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1_000_000, help="requests in all (default 1M)")
    p.add_argument("--keys", type=int, default=10_000, help="distinct keys, cycled (default 10k)")
    p.add_argument("--checkpoint", type=int, help="first RSS reading after this many (default 10%% of --requests)")
    p.add_argument("--rpm", type=int, default=10 ** 9,
                   help="every key's rpm limit (default 1e9: limited, never reached; 0: no rpm limit, "
                        "so the limiter keeps no 60 s log of admissions)")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    checkpoint = args.checkpoint or max(1, args.requests // 10)
    if args.requests < 1 or args.keys < 1 or not 0 < checkpoint < args.requests:
        p.error("--requests and --keys must be >= 1 and --checkpoint between 1 and --requests")
    out = run_loop(run(args.requests, args.keys, checkpoint, args.rpm))
    first, last = out["marks"][str(checkpoint)], out["marks"][str(args.requests)]
    print(f"seekgate memory: {args.requests:,} requests over {args.keys:,} keys, in-process request path "
          f"({out['requests_per_s']:,} req/s, {os.cpu_count()} CPUs)")
    for label, mark in ((f"after {checkpoint:,}", first), (f"after {args.requests:,}", last)):
        print(f"  RSS {label:<16} {mark['rss'] / 2**20:8.1f} MiB   key cache {mark['key_cache']:,}, "
              f"policy memo {mark['policy_memo']:,}, limiter keys {mark['limiter_keys']:,}")
    print(f"  growth {out['growth']:+.1%}: {out['verdict']} (target: {out['target']}; reported, not asserted)")
    if out["first_mark_before_window_filled"]:
        print(f"  note: the first reading came {first['seconds']:g} s in, before the limiter's {WINDOW_S:g} s rpm "
              "log was full; the growth includes filling it (more --requests, or --rpm 0)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
