"""TLS against plaintext, side by side in one run: keep-alive throughput and new-connection handshakes per second.

    python bench/tls.py                       # 5 s cells, 2 rounds (medians), about 2 minutes
    python bench/tls.py --quick               # 2 s cells, 1 round: a smoke run
    python bench/tls.py --duration 10 --rounds 3 --concurrency 32 --json out.json

Starts the real tritonserver on the bench's models, then two seekgate processes on the same Triton,
one plaintext and one with TLS 1.3 (a `seekgate tls dev-cert` pair). Each cell sends the matrix's
fixed POST /v2/models/trivial/infer with the bench key, with `wrk`:
  keep-alive  c32 connections reused: what TLS costs per request (record encryption) once connected;
  new-conn    `Connection: close` on every request: each one a new TCP connection, and over TLS a
              full handshake, so its requests/s is the handshakes/s the server sustains.
Cells alternate plaintext / TLS within each round, so load from elsewhere on the host falls on both.
Figures, not assertions: tests/test_bench.py checks the pieces, never the timing.
"""

from __future__ import annotations

import argparse
import json
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):   # run as a script: the repository root on the path, as -m would
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, stack  # noqa: E402
from bench.matrix import load_for  # noqa: E402
from proxy.cli.devcert import make_dev_certs  # noqa: E402

MODES = ("plaintext", "tls")
KINDS = ("keep-alive", "new-conn")


def with_tls(config: Path, certs: dict[str, Path]) -> Path:
    """The same seekgate config, now serving TLS 1.3 with the dev server certificate."""
    data: dict[str, Any] = yaml.safe_load(config.read_text())
    data["server"] |= {"tls_cert_file": str(certs["server_cert"]), "tls_key_file": str(certs["server_key"])}
    config.write_text(yaml.safe_dump(data))
    return config


def start_tls_seekgate(config: Path, ca: Path, timeout: float = 60) -> stack.Service:
    """`python -m proxy serve` with TLS, once its liveness probe answers over https (verified by `ca`)."""
    port = yaml.safe_load(config.read_text())["server"]["http_port"]
    log = config.parent / "seekgate-tls.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                                cwd=stack.REPO, stdout=out, stderr=subprocess.STDOUT)
    service = stack.Service("seekgate tls", f"https://127.0.0.1:{port}", proc, log)
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise stack.Unavailable(f"seekgate tls exited with {proc.returncode}: {log.read_text()[-300:]}")
        try:
            with urllib.request.urlopen(service.url + "/v2/health/live", timeout=1, context=context) as r:
                if r.status == 200:
                    return service
        except OSError:
            pass
        time.sleep(0.2)
    service.stop()
    raise stack.Unavailable(f"seekgate tls not live after {timeout:.0f}s")


def cell_load(base_url: str, key: str, kind: str) -> loadgen.Load:
    load = load_for(base_url, "trivial", 1, key)
    if kind == "new-conn":
        load = loadgen.Load(load.url, load.body, (*load.headers, ("Connection", "close")))
    return load


def run(args: argparse.Namespace) -> dict[str, Any]:
    from proxy.local.tinymodel import build_tiny_checkpoint
    tool = loadgen.find_tool("wrk")   # hey reuses connections whatever the header says
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp_name:
        tmp = Path(tmp_name)
        certs = make_dev_certs(tmp / "certs")
        print("starting tritonserver (trivial) ...", file=sys.stderr, flush=True)
        triton = stack.triton_on_bench_models(tmp, build_tiny_checkpoint(tmp / "deepseek-tiny", seed=0))
        services: list[stack.Service] = []
        try:
            upstream = stack.upstream_of(triton)
            plain_cfg = stack.seekgate_config(tmp / "plain", upstream)
            tls_cfg = with_tls(stack.seekgate_config(tmp / "tls", upstream), certs)
            key = stack.create_key(plain_cfg)
            tls_key = stack.create_key(tls_cfg)
            plain = stack.start_seekgate(plain_cfg)
            services.append(plain)
            tls = start_tls_seekgate(tls_cfg, certs["ca"])
            services.append(tls)
            bases = {"plaintext": (plain.url, key), "tls": (tls.url, tls_key)}
            cells: dict[tuple[str, str], list[loadgen.Measured]] = {}
            for _ in range(args.rounds):
                for kind in KINDS:
                    for mode in MODES:
                        base, k = bases[mode]
                        m = loadgen.measure(tool, cell_load(base, k, kind), args.concurrency, args.duration)
                        cells.setdefault((mode, kind), []).append(m)
        finally:
            for service in services:
                service.stop()
            triton.stop()
    return {f"{mode} {kind}": loadgen.combine(runs).as_dict() for (mode, kind), runs in cells.items()}


def table(results: dict[str, Any], concurrency: int) -> str:
    lines = [f"{'':12} {'plaintext req/s':>16} {'TLS 1.3 req/s':>14} {'TLS/plain':>10} "
             f"{'p50 ms (p/t)':>14} {'p99 ms (p/t)':>14} {'errors (p/t)':>13}"]
    for kind in KINDS:
        p, t = results[f"plaintext {kind}"], results[f"tls {kind}"]
        ratio = t["requests_per_s"] / p["requests_per_s"] if p["requests_per_s"] else float("nan")

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"
        lines.append(f"{kind + f' c{concurrency}':12} {p['requests_per_s']:16.0f} {t['requests_per_s']:14.0f} "
                     f"{ratio:10.2f} {ms(p['p50_ms']) + '/' + ms(t['p50_ms']):>14} "
                     f"{ms(p['p99_ms']) + '/' + ms(t['p99_ms']):>14} {p['errors']:>6}/{t['errors']:<6}")
    lines.append("new-conn: every request a new connection (TLS: a full 1.3 handshake) -> req/s = handshakes/s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per cell (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each cell's median is reported (default 2)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="2 s cells, 1 round")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if args.quick:
        args.duration, args.rounds = 2.0, 1
    results = run(args)
    print(table(results, args.concurrency))
    if args.json:
        args.json.write_text(json.dumps({"concurrency": args.concurrency, "duration_s": args.duration,
                                         "rounds": args.rounds, "cells": results}, indent=2))


if __name__ == "__main__":
    main()
