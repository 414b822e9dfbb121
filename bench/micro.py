#!/usr/bin/env python
"""Micro-benchmarks of the per-request decisions: key and session verification, ABAC; cold and cached.

What it does
    Opens a real SQLite key store in a temp dir, issues the bench key (bench/stack.py's
    attributes) and mints a session JWT from it with the server's own set-up
    (`open_keyring`: envelope-encrypted Ed25519 signing key and pepper), loads the 50-rule
    policy from bench/policies/, then runs each operation in a loop on one thread for
    --seconds:

      key verify, cold           authn.authenticate without a cache: format + checksum,
                                 the chain read from SQLite, HMAC-SHA256, chain checks
      key verify, no store       the CPU part alone: parse_key, verify_secret, check_chain
      key verify, cached rN      authenticate with the KeyCache at the configured
                                 revision_check_ms N (the default config's)
      key verify, cached r0      the same with revision_check_ms 0: the store revision is
                                 read from SQLite on every request
      session verify, cold       authenticate of the JWT without a cache: EdDSA signature and
                                 claims, the revocation and chain reads from SQLite
      session JWT only           SessionAuthority.verify alone (signature + claims)
      session verify, cached rN  / cached r0: as for keys
      ABAC decision, cold        Authorizer.authorize with a new key id every call: casbin walks
                                 all 50 rules (the memo never hits)
      ABAC decision, cached      the same principal and route every call: the per-load memo

What it prints
    ops/s of wall time and ops per CPU-second of this process (user + system, every
    thread: aiosqlite's included). The second is "per core": the loop runs on one
    thread, and with store reads the aiosqlite thread adds its CPU on top. Then the
    issue 7 targets (cached key verification and cached ABAC >= 200k/s per core),
    reported, never asserted.

Usage
    python bench/micro.py [--seconds 2] [--only abac] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.stack import BENCH_LABELS, BENCH_MODELS, BENCH_ROLES, POLICY_DIR, run_loop  # noqa: E402
from proxy.context import Principal, Resource  # noqa: E402
from proxy.keys.cache import KeyCache  # noqa: E402
from proxy.keys.format import parse_key  # noqa: E402
from proxy.keys.hashing import verify_secret  # noqa: E402
from proxy.keys.issue import issue_key  # noqa: E402
from proxy.keys.secrets_setup import open_keyring  # noqa: E402
from proxy.paths import store_path  # noqa: E402
from proxy.settings import load_settings  # noqa: E402
from proxy.steps.authn import authenticate, check_chain  # noqa: E402
from proxy.steps.authz import Authorizer  # noqa: E402
from proxy.store.sqlite import SqliteStore  # noqa: E402

CLIENT_IP = "127.0.0.1"
ROUTE = Resource("model:trivial", "infer", model="trivial")
TARGET_OPS = 200_000
BATCH = 64   # calls between clock reads


def result(name: str, ops: int, wall: float, cpu: float, note: str = "") -> dict[str, Any]:
    return {"name": name, "ops": ops, "seconds": round(wall, 3),
            "ops_per_s": round(ops / wall) if wall else None,
            "ops_per_cpu_s": round(ops / cpu) if cpu > 0 else None,
            "us_per_op": round(wall / ops * 1e6, 3) if ops else None, "note": note}


def run_sync(name: str, fn: Callable[[int], object], seconds: float, note: str = "") -> dict[str, Any]:
    """Calls fn(i) in batches until `seconds` pass; fn gets a running counter."""
    i = 0
    t0, c0 = time.perf_counter(), time.process_time()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        for _ in range(BATCH):
            fn(i)
            i += 1
    return result(name, i, time.perf_counter() - t0, time.process_time() - c0, note)


async def run_async(name: str, fn: Callable[[int], Awaitable[object]], seconds: float,
                    note: str = "") -> dict[str, Any]:
    i = 0
    t0, c0 = time.perf_counter(), time.process_time()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        for _ in range(BATCH):
            await fn(i)
            i += 1
    return result(name, i, time.perf_counter() - t0, time.process_time() - c0, note)


async def bench(seconds: float, only: set[str] | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    want = (lambda group: only is None or group in only)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="seekgate-micro-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        settings = load_settings(None, env={}, overrides={"data_dir": str(data_dir)})
        store = await SqliteStore.open(store_path(data_dir))
        # As the server starts: signing keys and pepper from the envelope (file KEK).
        keyring = await open_keyring(settings, data_dir, store)
        pepper, sessions = keyring.pepper, keyring.sessions
        try:
            rec, token = await issue_key(store, pepper, tier="user", owner="bench", roles=BENCH_ROLES,
                                         labels=BENCH_LABELS, models=BENCH_MODELS, expires_in_s=86400,
                                         now=time.time())
            now = time.time()
            principal = await authenticate(token, store, pepper, CLIENT_IP, now, sessions)
            jwt_token = sessions.mint(principal, now).token

            # The configured interval (what `serve` runs) and 0 (the store revision read on every request).
            default_ms = settings.auth.key_cache_revision_check_ms
            check_intervals = sorted({default_ms, 0.0}, reverse=True)

            def interval_note(ms: float) -> str:
                return f"revision_check_ms {ms:g}" + (" (the default)" if ms == default_ms else "")

            def cache(revision_check_ms: float) -> KeyCache:
                return KeyCache(size=settings.auth.key_cache_size, ttl_s=3600,
                                revision_check_ms=revision_check_ms)

            async def auth(credential: str, key_cache: KeyCache | None) -> Principal:
                return await authenticate(credential, store, pepper, CLIENT_IP, time.time(), sessions, key_cache)

            if want("key"):
                rows.append(await run_async("key verify, cold", lambda i: auth(token, None), seconds,
                                            "store read + HMAC per call"))
                chain = await store.get_chain(rec.key_id)

                def key_cpu(i: int) -> None:
                    parse_key(token)
                    if not verify_secret(pepper, token, chain[0].secret_hash):
                        raise AssertionError("bench key does not verify")
                    check_chain(chain, CLIENT_IP, now)
                rows.append(run_sync("key verify, no store", key_cpu, seconds, "parse + HMAC + chain checks"))
                for ms in check_intervals:
                    kc = cache(ms)
                    rows.append(await run_async(f"key verify, cached r{ms:g}", lambda i, kc=kc: auth(token, kc),
                                                seconds, interval_note(ms)))
            if want("session"):
                rows.append(await run_async("session verify, cold", lambda i: auth(jwt_token, None), seconds,
                                            "EdDSA + revocation and chain reads"))
                rows.append(run_sync("session JWT only", lambda i: sessions.verify(jwt_token, now), seconds,
                                     "SessionAuthority.verify"))
                for ms in check_intervals:
                    kc = cache(ms)
                    rows.append(await run_async(f"session verify, cached r{ms:g}",
                                                lambda i, kc=kc: auth(jwt_token, kc), seconds, interval_note(ms)))
        finally:
            keyring.envelope.kek.close()
            await store.close()

    if want("abac"):
        authorizer = Authorizer.from_dir(POLICY_DIR)
        fresh = [Principal(key_id=f"k{i:011d}", tier="user", owner="bench", roles=BENCH_ROLES,
                           labels=dict(BENCH_LABELS), models=BENCH_MODELS) for i in range(8192)]
        if not authorizer.authorize(fresh[0], ROUTE, CLIENT_IP, datetime.now(timezone.utc)).allowed:
            raise AssertionError("the bench principal is not allowed by bench/policies")

        def cold(i: int) -> None:
            # An owner the memo has not seen (the memo is keyed by what rules can read, so a new
            # key id alone would hit): casbin evaluates every rule.
            p = fresh[i % len(fresh)]
            authorizer.authorize(Principal(p.key_id, p.tier, f"{p.owner}-{i}", p.roles, p.labels, p.models),
                                 ROUTE, CLIENT_IP, datetime.now(timezone.utc))
        rows.append(run_sync("ABAC decision, cold", cold, seconds, f"{len(authorizer.policy.rules)} rules, memo miss"))
        same = fresh[0]
        rows.append(run_sync("ABAC decision, cached",
                             lambda i: authorizer.authorize(same, ROUTE, CLIENT_IP, datetime.now(timezone.utc)),
                             seconds, "memo hit (includes datetime.now, as the pipeline calls it)"))
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {r["name"]: r for r in rows}
    default_key = next((r["name"] for r in rows if r["name"].startswith("key verify, cached")
                        and r["note"].endswith("(the default)")), "key verify, cached")
    out = []
    for target, name in (("cached key verification >= 200k/s per core", default_key),
                         ("cached ABAC decision >= 200k/s per core", "ABAC decision, cached")):
        value = by_name.get(name, {}).get("ops_per_cpu_s")
        out.append({"target": target, "row": name, "value": value,
                    "verdict": "n/a" if value is None else ("MET" if value >= TARGET_OPS else "NOT MET")})
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'operation':<30} {'ops/s':>10} {'ops/cpu-s':>10} {'us/op':>8}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['name']:<30} {r['ops_per_s'] or 0:>10,} {r['ops_per_cpu_s'] or 0:>10,} "
                     f"{r['us_per_op'] or 0:>8.2f}  {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per operation (default 2)")
    p.add_argument("--only", action="append", choices=("key", "session", "abac"),
                   help="run only this group (repeatable)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    rows = run_loop(bench(args.seconds, set(args.only) if args.only else None))
    print(f"seekgate micro-benchmarks: {args.seconds:g} s per operation, one thread, {os.cpu_count()} CPUs")
    print(format_table(rows))
    print("targets (reported, not asserted):")
    checked = targets(rows)
    for t in checked:
        print(f"  {t['verdict']:<8} {t['target']}" + ("" if t["value"] is None else f"  ({t['value']:,} ops/cpu-s)"))
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "python": platform.python_version()},
            "seconds": args.seconds, "results": rows, "targets": checked}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
