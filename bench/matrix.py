#!/usr/bin/env python
"""The benchmark matrix: Triton direct, a bare passthrough, seekgate and seekgate --workers 2, side by side.

What it does
    Builds the tiny DeepSeek-V3 checkpoint (or takes --checkpoint), starts the real
    `tritonserver` on a repository holding triton_models/deepseek and the bench's own
    `trivial` echo model (bench/models/trivial), and in front of that one Triton:

      a  nothing: Triton direct;
      b  bench/passthrough.py: aiohttp + uvloop, one process, no checks, pooled
         ClientSession, body and answer streamed through;
      c  `python -m proxy serve` with a key issued by `seekgate keys create`, the
         50-rule policy in bench/policies/, audit (batched) and metrics on;
      d  the same with `--workers 2` (reported as unavailable if that fails to start).

    Then, for each model and concurrency, it drives each path in turn with `wrk`
    (or `hey`) sending one fixed POST: `/v2/models/trivial/infer` with a 4-float
    tensor, and `/v2/models/deepseek/generate` with max_tokens 8 (the same fields in
    every request, so Triton's dynamic batcher can batch them). Each model is warmed
    up on Triton directly first, each cell gets a warm-up of its own, and then
    --duration seconds of closed-loop load split into --rounds rounds; the paths take
    turns in ABBA order (a b c d, then d c b a), so a drift in machine load hits them
    alike. Before every measurement the bench waits until Triton has finished the
    requests the previous one left in flight.

What it prints
    One table, one row per cell: req/s (successful responses), p50 and p99 latency
    (ms, from the load generator), on the seekgate rows `/b` and `/a` (req/s over the
    passthrough's and over Triton direct's: c/b and c/a on the c rows) and `+p50/a`
    (p50 minus Triton direct's); then issue 7's targets with MET / NOT MET. The same,
    plus settings and machine, goes to --json. Targets are reported, never asserted:
    the exit status is 1 only when requests failed.

Usage
    python bench/matrix.py                  # 10 s cells, about 4 minutes
    python bench/matrix.py --quick          # 2 s cells: a smoke run
    python bench/matrix.py --duration 20 --models trivial --concurrency 1,32,64 --json out.json
    python bench/matrix.py --models deepseek --model-cpus 0   # Triton on CPU 0, proxies and wrk on the rest
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import urllib.error
import urllib.request
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import loadgen, report, stack  # noqa: E402

TRIVIAL_BODY = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
PROMPT = "The quick brown fox"


def request_for(model: str, max_tokens: int) -> tuple[str, bytes]:
    """(path, body) of the one request a model's cells send."""
    if model == "trivial":
        return "/v2/models/trivial/infer", json.dumps(TRIVIAL_BODY).encode()
    return f"/v2/models/{model}/generate", json.dumps({"text_input": PROMPT, "max_tokens": max_tokens}).encode()


def load_for(base_url: str, model: str, max_tokens: int, key: str | None) -> loadgen.Load:
    path, body = request_for(model, max_tokens)
    headers = [("Content-Type", "application/json")]
    if key:
        headers.append(("Authorization", f"Bearer {key}"))
    return loadgen.Load(base_url + path, body, tuple(headers))


def check_once(load: loadgen.Load) -> None:
    """One request before any load: a refusal or a broken path stops the run with the reason."""
    req = urllib.request.Request(load.url, data=load.body, headers=dict(load.headers), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {load.url} answered {exc.code}: {exc.read()[:300]!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell (default 10)")
    p.add_argument("--rounds", type=int, default=2,
                   help="split each cell's duration into this many rounds, paths in ABBA order (default 2)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each cell (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s cells in one round, 1 s warm-ups")
    p.add_argument("--models", default="trivial,deepseek", help="comma-separated: trivial, deepseek")
    p.add_argument("--concurrency", default="1,32", help="comma-separated levels (default 1,32)")
    p.add_argument("--paths", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--workers", type=int, default=2, help="worker processes for path d (default 2)")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of the deepseek generate (default 8)")
    p.add_argument("--tool", choices=("auto", "wrk", "hey"), default="auto", help="load generator (default wrk)")
    p.add_argument("--checkpoint", type=Path, help="HF checkpoint dir (default: build the tiny one)")
    p.add_argument("--triton-url", help="use this running Triton (serving deepseek and trivial, e.g. "
                                        "started on bench/models) instead of starting one")
    p.add_argument("--triton-grpc", help="its gRPC host:port, for seekgate's config (default: host:8001)")
    p.add_argument("--model-cpus", help="run Triton on these CPUs only (e.g. 0 or 0-3) and everything else (the "
                                        "proxies, the load generator) on the others: a GPU host's split, where the "
                                        "model does not compete with the proxy for CPU")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "matrix.json",
                   help="where the JSON goes (default bench/results/matrix.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds = 2.0, 1.0, 1
    args.models = [m for m in args.models.split(",") if m]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.paths = [x for x in args.paths.split(",") if x]
    if set(args.models) - {"trivial", "deepseek"} or set(args.paths) - set(report.PATHS):
        p.error("--models takes trivial,deepseek and --paths a,b,c,d")
    if args.duration <= 0 or args.warmup < 0 or min(args.concurrency) < 1 or args.rounds < 1:
        p.error("--duration, --concurrency and --rounds must be > 0, --warmup >= 0")
    if args.model_cpus:
        if args.triton_url:
            p.error("--model-cpus places the Triton this script starts; it cannot move one at --triton-url")
        try:
            args.model_cpus = cpu_list(args.model_cpus)
        except ValueError as exc:
            p.error(f"--model-cpus: {exc}")
    return args


def cpu_list(text: str) -> set[int]:
    """'0', '0,2' or '0-3' as a set of CPUs, which must leave this machine at least one for the rest."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    available = os.sched_getaffinity(0)
    if not cpus or not cpus < available:
        raise ValueError(f"{text!r} must name some, not all, of the CPUs available here ({sorted(available)})")
    return cpus


def run_cells(args: argparse.Namespace, tool: tuple[str, str], services: dict[str, stack.Service | str],
              keys: dict[str, str | None], triton_url: str) -> list[report.Row]:
    rows: list[report.Row] = []
    for model in args.models:
        for path in args.paths:   # every path answers once before any is measured
            service = services[path]
            if isinstance(service, stack.Service):
                check_once(load_for(service.url, model, args.max_tokens, keys[path]))
        if args.warmup > 0:
            # The model's first batches of each size are slow (allocation, kernels): not in any cell.
            print(f"  {model}: warm-up at c{max(args.concurrency)} ...", file=sys.stderr, flush=True)
            loadgen.measure(tool, load_for(triton_url, model, args.max_tokens, None), max(args.concurrency),
                            2 * args.warmup)
        for conc in args.concurrency:
            runs: dict[str, list[loadgen.Measured]] = {p: [] for p in args.paths}
            cpu: dict[str, list[float | None]] = {p: [] for p in args.paths}   # proxy CPU s per round
            for rnd in range(args.rounds):
                # ABBA: a drift in machine load over the run hits every path alike.
                for path in (args.paths if rnd % 2 == 0 else args.paths[::-1]):
                    service = services[path]
                    if not isinstance(service, stack.Service):
                        continue
                    load = load_for(service.url, model, args.max_tokens, keys[path])
                    print(f"  {model} c{conc} {path} {report.PATHS[path]} (round {rnd + 1}) ...",
                          file=sys.stderr, flush=True)
                    if args.warmup > 0 and rnd == 0:
                        loadgen.measure(tool, load, conc, args.warmup)
                    stack.wait_idle(triton_url, model)   # the last cell's or warm-up's leftovers first
                    pid = service.proc.pid if service.proc is not None else None   # None: Triton itself
                    cpu0 = stack.tree_cpu_s(pid) if pid else None
                    runs[path].append(loadgen.measure(tool, load, conc, args.duration / args.rounds))
                    cpu1 = stack.tree_cpu_s(pid) if pid else None
                    cpu[path].append(cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)
            for path in args.paths:
                service = services[path]
                label = {"label": f"seekgate x{args.workers}"} if path == "d" else {}
                if not isinstance(service, stack.Service):
                    rows.append(report.cell(model, conc, path, unavailable=service, **label))
                    continue
                measured = loadgen.combine(runs[path])
                ok = measured.requests - measured.errors
                used = None if None in cpu[path] else sum(c for c in cpu[path] if c is not None)
                rows.append(report.cell(
                    model, conc, path, measured.as_dict(),
                    proxy_cpu_ms_per_request=round(used * 1000 / ok, 3) if used is not None and ok > 0 else None,
                    rounds_requests_per_s=[m.requests_per_s for m in runs[path]], **label))
    return report.add_ratios(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tool = loadgen.find_tool(args.tool)
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    from proxy.local.tinymodel import build_tiny_checkpoint

    with ExitStack() as cleanup:
        tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="seekgate-matrix-")))
        if args.triton_url:
            triton_url = args.triton_url.rstrip("/")
            host = triton_url.split("://", 1)[-1].split(":", 1)[0]
            upstream = {"http_url": triton_url, "grpc_target": args.triton_grpc or f"{host}:8001"}
        else:
            checkpoint = args.checkpoint or build_tiny_checkpoint(tmp / "deepseek-tiny", seed=0)
            print("starting tritonserver (deepseek + trivial) ...", file=sys.stderr, flush=True)
            everything = os.sched_getaffinity(0)
            if args.model_cpus:   # Triton and its model stubs inherit the CPUs they start on
                os.sched_setaffinity(0, args.model_cpus)
            try:
                triton = stack.triton_on_bench_models(tmp, checkpoint)
            finally:
                # The proxies and the load generator, started from here on, get the remaining CPUs.
                os.sched_setaffinity(0, everything - args.model_cpus if args.model_cpus else everything)
            cleanup.callback(triton.stop)
            triton_url, upstream = triton.http_url, stack.upstream_of(triton)
        services: dict[str, stack.Service | str] = {"a": stack.Service("triton", triton_url)}
        keys: dict[str, str | None] = {"a": None}
        if "b" in args.paths:
            passthrough = stack.start_passthrough(triton_url, tmp / "passthrough.log")
            cleanup.callback(passthrough.stop)
            services["b"] = passthrough
        for path, workers in (("c", 1), ("d", args.workers)):
            if path not in args.paths:
                continue
            config = stack.seekgate_config(tmp / f"seekgate-{path}", upstream)
            keys[path] = stack.create_key(config)
            print(f"starting seekgate ({path}, workers {workers}) ...", file=sys.stderr, flush=True)
            try:
                gate = stack.start_seekgate(config, workers)
            except stack.Unavailable as exc:
                services[path] = str(exc)
                print(f"  {path} unavailable: {exc}", file=sys.stderr, flush=True)
                continue
            services[path] = gate
            cleanup.callback(gate.stop)
        keys["b"] = keys.get("c")   # b sees the same request bytes as c; it forwards the header unread
        rows = run_cells(args, tool, services, keys, triton_url)

    high = max(args.concurrency)
    print(f"\nseekgate benchmark matrix: {tool[0]}, {args.duration:g} s per cell in {args.rounds} round(s) "
          f"after {args.warmup:g} s warm-up, "
          f"deepseek max_tokens {args.max_tokens}, {os.cpu_count()} CPUs"
          + (f", Triton on CPUs {sorted(args.model_cpus)} and the rest on the others" if args.model_cpus else ""))
    print(report.format_table(rows))
    print("/b, /a: req/s over (b) passthrough's and (a) Triton direct's (c/b and c/a on the c rows; "
          "b/a on the b rows: the hop alone); +p50/a: p50 minus (a)'s")
    print("targets (reported, not asserted):")
    print(report.format_targets(report.targets(rows, high)))
    unsteady = report.noisy(rows)
    if unsteady:
        print("noisy cells (a round under half the speed of another; rerun, or raise --duration/--rounds):")
        print("\n".join(f"  {line}" for line in unsteady))
    for r in rows:
        if r.get("errors"):
            print(f"errors on {r['model']} c{r['concurrency']} {r['path']}: {r.get('first_error')}")
    settings = {"duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup, "models": args.models,
                "concurrency": args.concurrency, "paths": args.paths, "workers_d": args.workers,
                "max_tokens": args.max_tokens, "tool": tool[0],
                "model_cpus": sorted(args.model_cpus) if args.model_cpus else None,
                "prompt": PROMPT, "trivial_body": TRIVIAL_BODY,
                "policy": "bench/policies (50 rules, the bench key matches rule 48)"}
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
               "python": platform.python_version()}
    doc = report.document(rows, settings, machine, datetime.now(timezone.utc).isoformat(timespec="seconds"), high)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 1 if any(r.get("errors") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
