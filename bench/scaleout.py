#!/usr/bin/env python
"""One replica on the shared backends (PostgreSQL + Redis) against one on SQLite, and three replicas against one.

What it does
    Starts the real Triton on the bench's models, a fresh PostgreSQL database (the running server
    or a private one, tests/backends.py) and a Redis (likewise, under a key prefix of this run),
    then three seekgate processes on that store and Redis (one root key file mounted by all) and one
    seekgate on its own SQLite file with limits counted in-process. Each of the two key populations
    gets one bench key made by the CLI with rpm/tpm limits set high enough never to refuse, so every
    request goes through the limiter (a Redis script per admission on the shared side).

    Paths, measured in alternating rounds (ABC, CBA, ...) so load drift hits all of them alike:
      sqlite     one replica, SQLite store, in-process limits (today's single node)
      pg         one replica, PostgreSQL store, in-process limits (which of the two backends costs what)
      shared     replica 1 alone, PostgreSQL store, Redis limits
      shared x3  all three replicas at once, the concurrency split between them (one wrk each);
                 only at concurrency 3 and up

What it prints
    Per model and concurrency: each path's req/s (sum over wrk processes for x3), p50 and p99 (the
    median round; for x3 the slowest replica's), then shared/sqlite throughput against the target
    (>= 0.90): the median of per-round ratios (each round's two runs are seconds apart, so load
    drifting between rounds cancels out), with their range; the p50 difference at c1 against its
    target (<= 0.2 ms), and x3/shared.
    Also CPU per request (median round, from /proc): `proxy` = the path's seekgate process(es),
    `backends` = every postgres and redis-server process of the machine. On a machine where the
    backends share the proxy's cores (this bench's default) their CPU is taken from seekgate's
    throughput; in a deployment they run elsewhere, so the two columns say which side costs what.

Usage
    python bench/scaleout.py [--models trivial,deepseek] [--concurrency 1,32] [--rounds 3] [--duration 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, stack  # noqa: E402
from bench.matrix import check_once, load_for  # noqa: E402
from bench.proxy_overhead import process_cpu  # noqa: E402
from tests.backends import admin_url_or_private, create_database, drop_database, redis_url_or_private  # noqa: E402

REPO = stack.REPO
# High enough that a bench run never meets them; set, so the limiter runs its scripts on every request.
BENCH_LIMITS = {"rpm": 100_000_000, "tpm": 1_000_000_000}
PATHS = ("sqlite", "pg", "shared", "shared x3")
TARGET_RATIO = 0.90
TARGET_P50_MS = 0.2


def configure(root: Path, upstream: dict[str, str], shared: dict[str, Any] | None) -> Path:
    """stack.seekgate_config, plus the store URL, Redis and root key file when `shared` says so."""
    config = stack.seekgate_config(root, upstream)
    if shared:
        settings = yaml.safe_load(config.read_text())
        settings.update(shared)
        config.write_text(yaml.safe_dump(settings))
    return config


def create_limited_key(config: Path) -> str:
    """The bench key (stack.create_key's roles, labels, models) with BENCH_LIMITS set."""
    cmd = [sys.executable, "-m", "proxy", "keys", "create", "--config", str(config), "--tier", "user",
           "--name", "bench", "--expires", "1d", "--json"]
    cmd += [a for r in stack.BENCH_ROLES for a in ("--role", r)]
    cmd += [a for k, v in stack.BENCH_LABELS.items() for a in ("--label", f"{k}={v}")]
    cmd += [a for m in stack.BENCH_MODELS for a in ("--model", m)]
    cmd += [a for k, v in BENCH_LIMITS.items() for a in (f"--{k}", str(v))]
    made = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        raise RuntimeError(f"keys create failed ({made.returncode}): {made.stderr.strip()[-300:]}")
    return str(json.loads(made.stdout)["key"])


def split(concurrency: int, parts: int) -> list[int]:
    """`concurrency` connections over `parts` wrk processes, at least one each."""
    base, extra = divmod(concurrency, parts)
    return [max(1, base + (1 if i < extra else 0)) for i in range(parts)]


def measure_many(tool: tuple[str, str], loads: list[loadgen.Load], concurrency: int, seconds: float
                 ) -> loadgen.Measured:
    """One wrk per load, all at once; their successes summed, the slowest one's p50/p99."""
    shares = split(concurrency, len(loads))
    with ThreadPoolExecutor(len(loads)) as pool:
        runs = list(pool.map(lambda lc: loadgen.measure(tool, lc[0], lc[1], seconds), zip(loads, shares, strict=True)))
    p50s = [m.p50_ms for m in runs if m.p50_ms is not None]
    p99s = [m.p99_ms for m in runs if m.p99_ms is not None]
    return loadgen.Measured(runs[0].tool, concurrency, sum(m.requests for m in runs), sum(m.errors for m in runs),
                            max(m.seconds for m in runs), round(sum(m.requests_per_s for m in runs), 2),
                            max(p50s) if p50s else None, max(p99s) if p99s else None,
                            next((m.first_error for m in runs if m.first_error), None))


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (0 for one that is gone)."""
    return sum(process_cpu(pid)() or 0.0 for pid in pids)


def backend_pids() -> list[int]:
    """Every PostgreSQL and Redis server process on the machine (the bench's may be the machine's own)."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("postgres", "redis-server"):
                found.append(int(comm.parent.name))
        except OSError:
            continue
    return found


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="trivial,deepseek")
    p.add_argument("--concurrency", default="1,32", help="comma-separated (default 1,32)")
    p.add_argument("--rounds", type=int, default=5, help="counted rounds per cell and path (default 5)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per round and path (default 4)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    tool = loadgen.find_tool("auto")
    from proxy.local.tinymodel import build_tiny_checkpoint

    load_before = loadavg()
    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as cleanup:
        tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="seekgate-scaleout-")))
        admin_url, private_pg = admin_url_or_private()
        if private_pg is not None:
            cleanup.callback(private_pg.destroy)
        store_url = asyncio.run(create_database(admin_url))
        cleanup.callback(lambda: asyncio.run(drop_database(admin_url, store_url)))
        redis_url, private_redis = redis_url_or_private()
        if private_redis is not None:
            cleanup.callback(private_redis.destroy)
        root_key = tmp / "root.key"
        root_key.write_bytes(secrets.token_bytes(32))
        os.chmod(root_key, 0o600)
        shared = {"store": {"url": store_url, "auto_migrate": True},
                  "redis": {"url": redis_url, "key_prefix": f"seekgate:bench:{secrets.token_hex(4)}:"},
                  "crypto": {"root_key_file": str(root_key)}}

        triton = stack.triton_on_bench_models(tmp, build_tiny_checkpoint(tmp / "deepseek-tiny", seed=0))
        cleanup.callback(triton.stop)
        upstream = stack.upstream_of(triton)

        sqlite_config = configure(tmp / "sqlite", upstream, None)
        sqlite_key = create_limited_key(sqlite_config)
        sqlite = stack.start_seekgate(sqlite_config)
        cleanup.callback(sqlite.stop)
        replicas = []
        for i in range(3):
            config = configure(tmp / f"shared{i}", upstream, shared)
            replicas.append(stack.start_seekgate(config))
            cleanup.callback(replicas[-1].stop)
            if i == 0:   # replica 0 has migrated the fresh database; the key is one row every replica reads
                shared_key = create_limited_key(config)

        pg_config = configure(tmp / "pg", upstream, {k: v for k, v in shared.items() if k != "redis"})
        pg = stack.start_seekgate(pg_config)
        cleanup.callback(pg.stop)
        procs = {"sqlite": [sqlite.proc.pid] if sqlite.proc else [], "pg": [pg.proc.pid] if pg.proc else [],
                 "shared": [replicas[0].proc.pid] if replicas[0].proc else [],
                 "shared x3": [r.proc.pid for r in replicas if r.proc]}

        for model in models:
            for c in levels:
                loads = {"sqlite": [load_for(sqlite.url, model, args.max_tokens, sqlite_key)],
                         "pg": [load_for(pg.url, model, args.max_tokens, shared_key)],
                         "shared": [load_for(replicas[0].url, model, args.max_tokens, shared_key)]}
                if c >= len(replicas):
                    loads["shared x3"] = [load_for(r.url, model, args.max_tokens, shared_key) for r in replicas]
                paths = [name for name in PATHS if name in loads]
                for path_loads in loads.values():
                    for load in path_loads:
                        check_once(load)
                runs: dict[str, list[loadgen.Measured]] = {name: [] for name in paths}
                cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
                for rnd in range(args.rounds + 1):   # round 0 warms every path and is not counted
                    for name in (paths if rnd % 2 == 0 else paths[::-1]):
                        stack.wait_idle(triton.http_url, model)
                        backends = backend_pids()
                        before = cpu_s(procs[name]), cpu_s(backends)
                        measured = measure_many(tool, loads[name], c, args.duration)
                        after = cpu_s(procs[name]), cpu_s(backends)
                        if rnd:
                            runs[name].append(measured)
                            done = max(1, int(measured.requests))
                            cpu[name].append(((after[0] - before[0]) / done * 1e6, (after[1] - before[1]) / done * 1e6))
                            print(f"  {model} c{c} round {rnd} {name}: {measured.requests_per_s:.1f} req/s, "
                                  f"p50 {measured.p50_ms} ms", file=sys.stderr, flush=True)
                results[f"{model} c{c}"] = {name: summary(measured) | {
                    "proxy_us": statistics.median(u for u, _ in cpu[name]),
                    "backends_us": statistics.median(b for _, b in cpu[name])} for name, measured in runs.items()}
    load_after = loadavg()
    report(results, args, load_before, load_after)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "load": [load_before, load_after]}, indent=2, default=str))
    return 1 if any(r["errors"] for cell in results.values() for r in cell.values()) else 0


def summary(runs: list[loadgen.Measured]) -> dict[str, Any]:
    """The median round's figures of one path in one cell."""
    return {"req_s": statistics.median(m.requests_per_s for m in runs),
            "p50_ms": statistics.median(m.p50_ms for m in runs if m.p50_ms is not None),
            "p99_ms": statistics.median(m.p99_ms for m in runs if m.p99_ms is not None),
            "errors": sum(m.errors for m in runs),
            "first_error": next((m.first_error for m in runs if m.first_error), None),
            "rounds_req_s": [round(m.requests_per_s, 1) for m in runs]}


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, before: str, after: str) -> None:
    print(f"\n{args.rounds} alternating rounds of {args.duration:g} s per path, max_tokens {args.max_tokens}; "
          f"{before} before, {after} after (stamp {time.strftime('%Y-%m-%d %H:%M')})")
    print(f"{'cell':<16}{'path':<11}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'proxy us/req':>14}{'backends us/req':>17}")
    for cell, rows in results.items():
        for name, r in rows.items():
            print(f"{cell:<16}{name:<11}{r['req_s']:>9.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}"
                  f"{r['proxy_us']:>14.0f}{r['backends_us']:>17.0f}")
        sq, sh, x3 = rows["sqlite"], rows["shared"], rows.get("shared x3")
        # Paired: each round's shared against the sqlite run beside it (seconds apart, the same
        # machine load), then the median; drift between rounds cancels out of it.
        paired = [a / b for a, b in zip(sh["rounds_req_s"], sq["rounds_req_s"], strict=True) if b]
        ratio = statistics.median(paired) if paired else float("nan")
        line = (f"{'':<16}shared/sqlite {ratio:.3f} [{min(paired, default=0):.2f}-{max(paired, default=0):.2f}]"
                f" (target >= {TARGET_RATIO:.2f}: {'met' if ratio >= TARGET_RATIO else 'MISSED'})")
        if cell.endswith(" c1"):
            d = sh["p50_ms"] - sq["p50_ms"]
            line += f"; p50 +{d:.2f} ms (target <= {TARGET_P50_MS} ms: {'met' if d <= TARGET_P50_MS else 'MISSED'})"
        if x3 is not None and sh["req_s"]:
            line += f"; x3/shared {x3['req_s'] / sh['req_s']:.3f}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
