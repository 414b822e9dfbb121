#!/usr/bin/env python
"""Is the engine's `static` mode a faithful stand-in for the model.py it replaced? Both, and the engine, side by side.

bench/batching.py measures "today's static batching" as the new engine run with
`scheduling="static"` (a batch admitted when the previous one is done, decoded until its
longest row finishes) behind the old dynamic batcher. This runs the code that was really
there before issue 19 beside it: model.py and config.pbtxt as of OLD_REV (BatchDecoder over
transformers' own cache, growing it each step), read from this repository's git history, on
the same tiny checkpoint, through the real Triton directly. Three Tritons up at once (`old`,
`static`, `inflight`); every round runs the burst on each, the order reversed every other round.

It prints, per server, the medians over rounds of the short requests' p50 latency, the total
time and tokens/s, and the in-flight engine's per-round short-p50 ratio against each baseline.

Usage
    python bench/old_static.py [--rounds 9] [--burst 32] [--short 4] [--long 64]

A benchmark, not a test: exits 0 whatever the figures (1 if a request fails).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import batching, stack  # noqa: E402

# The last commit before the in-flight engine (ff2b033): model.py decoded each batch whole.
OLD_REV = "ff2b033^"
OLD_FILES = {"1/model.py": "triton_models/deepseek/1/model.py", "config.pbtxt": "triton_models/deepseek/config.pbtxt"}


def old_repository(root: Path, rev: str = OLD_REV) -> Path:
    """A model repository whose `deepseek` is model.py and config.pbtxt as they were at `rev`."""
    model = root / "repo-old" / "deepseek"
    (model / "1").mkdir(parents=True, exist_ok=True)
    for dest, source in OLD_FILES.items():
        shown = subprocess.run(["git", "-C", str(stack.REPO), "show", f"{rev}:{source}"],
                               capture_output=True, text=True)
        if shown.returncode:   # an export or a shallow clone has no history to read it from
            raise SystemExit(f"old_static.py reads {source} at {rev} from git: {shown.stderr.strip()}")
        (model / dest).write_text(shown.stdout)
    return model.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--short", type=int, default=4)
    p.add_argument("--long", type=int, default=64)
    args = p.parse_args(argv)
    from proxy.local.tinymodel import build_tiny_checkpoint

    plan = batching.workload("burst", args.burst, args.short, args.long, 0)
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="seekgate-old-static-") as tmp:
        root = Path(tmp)
        checkpoint = build_tiny_checkpoint(root / "ck", seed=0)
        repos = {"old": old_repository(root), "static": batching.repository(root, "static", gpu=False),
                 "inflight": batching.repository(root, "inflight", gpu=False)}
        servers = {name: batching.start_triton(repo, root / f"data-{name}", checkpoint) for name, repo in repos.items()}
        try:
            sides = [(name, t.http_url, f"http://127.0.0.1:{t.launch.metrics_port}/metrics")
                     for name, t in servers.items()]
            for _, url, metrics in sides:   # warm-up: torch's first-use costs
                stack.run_loop(batching.run_workload(url, {}, metrics, plan, args.short))
            for r in range(args.rounds):
                for name, url, metrics in sides if r % 2 == 0 else sides[::-1]:
                    runs.setdefault(name, []).append(
                        stack.run_loop(batching.run_workload(url, {}, metrics, plan, args.short)))
        finally:
            for t in servers.values():
                t.stop()
    print(f"burst of {args.burst} through Triton directly, half {args.short} and half {args.long} tokens; "
          f"medians of {args.rounds} rounds")
    print(f"{'server':<9} {'short p50 ms':>12} {'total ms':>9} {'tok/s':>8}  per-round short p50 ms")
    for name, ms in runs.items():
        m = batching.median_of(ms)
        print(f"{name:<9} {m['short_p50_s'] * 1000:>12.1f} {m['total_s'] * 1000:>9.0f} {m['tokens_per_s']:>8.0f}  "
              + " ".join(f"{x['short_p50_s'] * 1000:.0f}" for x in ms))
    for base in ("old", "static"):
        ratios = [b["short_p50_s"] / i["short_p50_s"] for b, i in zip(runs[base], runs["inflight"], strict=True)]
        print(f"in-flight short p50 vs {base}: {statistics.median(ratios):.2f}x lower "
              f"[{min(ratios):.1f}-{max(ratios):.1f}]")
    return 1 if any(m["failed"] for ms in runs.values() for m in ms) else 0


if __name__ == "__main__":
    sys.exit(main())
