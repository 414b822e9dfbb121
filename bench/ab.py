#!/usr/bin/env python
"""Two versions of seekgate side by side against one Triton: this tree's code and an older commit's.

What it does
    Checks the older commit out into a temporary git worktree, starts the real Triton on the
    bench's models, the bare aiohttp passthrough, and one seekgate from each tree (each with its
    own data dir, its own key made by its own CLI, its own bench policy). Then it measures the
    three in alternating rounds (ABC, CBA, ...) at one concurrency with wrk, so a drift in machine
    load hits every path alike. A matrix run compares machines and moments; this compares code.

What it prints
    Per path: the median round's req/s, p50 and p99, its CPU per request, and /pt, the median
    round over the passthrough's median round. `new/old` is the ratio of the two seekgates.

Usage
    python bench/ab.py --old 0ece422 [--model trivial] [--concurrency 32] [--rounds 8] [--duration 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, stack  # noqa: E402
from bench.matrix import load_for  # noqa: E402

REPO = stack.REPO


def start_seekgate_from(tree: Path, root: Path, upstream: dict[str, str]) -> tuple[stack.Service, str]:
    """A seekgate run from `tree` (cwd and sys.path[0]: that tree's `proxy` wins over the editable install)."""
    config = stack.seekgate_config(root, upstream, policy_dir=tree / "bench" / "policies")
    cmd = [sys.executable, "-m", "proxy", "keys", "create", "--config", str(config), "--tier", "user",
           "--name", "bench", "--expires", "1d", "--json"]
    cmd += [a for r in stack.BENCH_ROLES for a in ("--role", r)]
    cmd += [a for k, v in stack.BENCH_LABELS.items() for a in ("--label", f"{k}={v}")]
    cmd += [a for m in stack.BENCH_MODELS for a in ("--model", m)]
    made = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        raise RuntimeError(f"keys create in {tree} failed: {made.stderr.strip()[-300:]}")
    key = str(json.loads(made.stdout)["key"])
    port = yaml.safe_load(config.read_text())["server"]["http_port"]
    log = root / "seekgate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], cwd=tree,
                                stdout=out, stderr=subprocess.STDOUT)
    return stack.live(stack.Service(f"seekgate ({tree.name})", f"http://127.0.0.1:{port}", proc, log)), key


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the older commit (any git revision)")
    p.add_argument("--model", default="trivial", choices=("trivial", "deepseek"))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per round and path")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    tool = loadgen.find_tool("auto")
    from proxy.local.tinymodel import build_tiny_checkpoint

    with ExitStack() as cleanup:
        tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="seekgate-ab-")))
        old_tree = tmp / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], cwd=REPO, check=True,
                       capture_output=True)
        cleanup.callback(lambda: subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)],
                                                cwd=REPO, capture_output=True))
        triton = stack.triton_on_bench_models(tmp, build_tiny_checkpoint(tmp / "deepseek-tiny", seed=0))
        cleanup.callback(triton.stop)
        upstream = stack.upstream_of(triton)
        pt = stack.start_passthrough(triton.http_url, tmp / "passthrough.log")
        cleanup.callback(pt.stop)
        new, new_key = start_seekgate_from(REPO, tmp / "new", upstream)
        cleanup.callback(new.stop)
        old, old_key = start_seekgate_from(old_tree, tmp / "old-gate", upstream)
        cleanup.callback(old.stop)
        paths: dict[str, tuple[stack.Service, str | None]] = {"passthrough": (pt, new_key), "new": (new, new_key),
                                                              "old": (old, old_key)}
        runs: dict[str, list[loadgen.Measured]] = {name: [] for name in paths}
        cpu: dict[str, list[float]] = {name: [] for name in paths}
        order = list(paths)
        for rnd in range(args.rounds + 1):   # round 0 warms every path up and is not counted
            for name in (order if rnd % 2 == 0 else order[::-1]):
                service, key = paths[name]
                load = load_for(service.url, args.model, args.max_tokens, key)
                stack.wait_idle(triton.http_url, args.model)
                pid = service.proc.pid if service.proc is not None else 0
                cpu0 = stack.tree_cpu_s(pid)
                measured = loadgen.measure(tool, load, args.concurrency, args.duration)
                cpu1 = stack.tree_cpu_s(pid)
                if rnd == 0:
                    continue
                print(f"  round {rnd} {name}: {measured.requests_per_s:.0f} req/s", file=sys.stderr, flush=True)
                runs[name].append(measured)
                ok = measured.requests - measured.errors
                if cpu0 is not None and cpu1 is not None and ok:
                    cpu[name].append((cpu1 - cpu0) * 1e6 / ok)
    rows: dict[str, dict[str, Any]] = {}
    for name, measured in runs.items():
        rows[name] = {"req_s": statistics.median(m.requests_per_s for m in measured),
                      "p50_ms": statistics.median(m.p50_ms for m in measured if m.p50_ms is not None),
                      "p99_ms": statistics.median(m.p99_ms for m in measured if m.p99_ms is not None),
                      "cpu_us_per_request": statistics.median(cpu[name]) if cpu[name] else None,
                      "errors": sum(m.errors for m in measured),
                      "rounds_req_s": [round(m.requests_per_s, 1) for m in measured]}
    base = rows["passthrough"]["req_s"]
    print(f"\n{args.model} c{args.concurrency}, {args.rounds} alternating rounds of {args.duration:g} s, "
          f"old = {args.old}, {os.cpu_count()} CPUs")
    print(f"{'path':<13}{'req/s':>9}{'/pt':>7}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'errors':>8}")
    for name, r in rows.items():
        cpu_text = f"{r['cpu_us_per_request']:.0f}" if r["cpu_us_per_request"] is not None else "-"
        print(f"{name:<13}{r['req_s']:>9.0f}{r['req_s'] / base:>7.3f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{cpu_text:>12}{r['errors']:>8}")
    print(f"new/old: {rows['new']['req_s'] / rows['old']['req_s']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2,
                                        default=str))
    return 1 if any(r["errors"] for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
