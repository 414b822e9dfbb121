#!/usr/bin/env python
"""What seekgate costs: the same requests to the same Triton, through seekgate and direct.

What it does
    Builds the tiny random-weight DeepSeek-V3 checkpoint in a temp dir, starts the
    real `tritonserver` on free loopback ports (CPU config.pbtxt: dynamic batching,
    max_batch_size 32), writes a seekgate config pointing at that Triton, creates a
    `user` key with the CLI and starts `python -m proxy serve` as a subprocess. Then,
    in one run and against that one Triton and model, it sends the same request
    either straight to Triton ("direct") or to seekgate ("seekgate", with
    `authorization: Bearer <key>`), for two protocols:

      grpc  `inference.GRPCInferenceService/ModelInfer` on `deepseek`: text_input
            BYTES [1,1] "hi", max_tokens INT32 [1,1] = 1 (raw service_pb2 stubs over
            grpc.aio, one channel per side);
      http  `POST /v2/models/deepseek/generate {"text_input": "hi", "max_tokens": 1}`
            (aiohttp, one connection pool per side);

    at two concurrency levels:

      1   one caller alternating direct and seekgate calls (the first side of each
          pair alternates too) for 2 x --duration seconds, so both sides see the same
          machine load at the same moments; req/s = calls / time spent in that
          side's calls;
      16  a closed loop of 16 asyncio workers on one side at a time, --duration
          seconds per side split in two rounds in the order direct, seekgate,
          seekgate, direct (ABBA: a drift in machine load over the run hits both
          sides equally); the two rounds of a side are summed (requests / summed
          wall time, percentiles over all latencies of both rounds).

    Every path gets a warm-up first (a few lone calls, then 1 s at concurrency 16),
    so connection set-up, seekgate's key cache and the model's batched code path are
    not in the figures. max_tokens 1 keeps the model's own time small, which makes
    the proxy's share as large as it gets: this is the worst case for the ratio.

How to read it
    One row per protocol x concurrency x path: requests/s, p50 and p99 latency (ms,
    client side, nearest rank), errors. On each seekgate row, `+p50 ms` is seekgate's
    p50 minus direct's p50 (the latency seekgate adds to a typical request),
    `ratio` is seekgate req/s / direct req/s (1.00 = no throughput cost), and
    `gate cpu` is the CPU time (user + system, from /proc) the seekgate process used
    per request it served (the JSON also has `seekgate_cpu_cores` at concurrency 16:
    how many cores seekgate kept busy). The client, seekgate and Triton share the
    machine's CPUs, so on a small machine the
    throughput ratio at concurrency 16 also counts the CPU seekgate takes away from
    Triton and the client; at concurrency 1 the added p50 is the cleaner figure.
    seekgate runs with its defaults (audit in batched mode), so the overhead
    includes authentication, policy, limits and the audit record per request.

Usage
    python bench/proxy_overhead.py [--duration 5] [--json out.json]

A benchmark, not a test: it asserts nothing; the exit status is 1 only if
requests failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.stack import stop_process  # noqa: E402

MODEL = "deepseek"
PROMPT = "hi"
HIGH = 16
WARMUP_S = 1.0

Call = Callable[[], Awaitable[None]]
CpuClock = Callable[[], "float | None"]


def process_cpu(pid: int) -> CpuClock:
    """user + system CPU seconds of one process, from /proc (None where there is no /proc)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def read() -> float | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / tick   # utime, stime (fields 14, 15)
    return read


def add_cpu(sample: Sample, before: float | None, after: float | None) -> None:
    if before is not None and after is not None:
        sample.cpu_s = (sample.cpu_s or 0.0) + (after - before)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


# ------------------------------------------------------------------ the two protocols' calls

def infer_request() -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    req.outputs.add(name="text_output")
    req.outputs.add(name="output_tokens")
    data = PROMPT.encode()
    req.raw_input_contents.append(struct.pack("<I", len(data)) + data)   # BYTES: 4-byte LE length + bytes
    req.raw_input_contents.append(struct.pack("<i", 1))
    return req


def grpc_call(channel: grpc.aio.Channel, key: str | None) -> Call:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = infer_request()
    metadata = (("authorization", f"Bearer {key}"),) if key else None

    async def call() -> None:
        resp = await stub.ModelInfer(request, metadata=metadata, timeout=60)
        if not resp.raw_output_contents:
            raise RuntimeError("ModelInfer answered without outputs")
    return call


def http_call(session: aiohttp.ClientSession, base_url: str, key: str | None) -> Call:
    url = f"{base_url}/v2/models/{MODEL}/generate"
    body = json.dumps({"text_input": PROMPT, "max_tokens": 1}).encode()
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"

    async def call() -> None:
        async with session.post(url, data=body, headers=headers) as r:
            payload = await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {payload[:200]!r}")
    return call


# ------------------------------------------------------------------ measurement

@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    busy_s: float = 0.0          # wall time this side was being measured
    errors: int = 0
    first_error: str | None = None
    cpu_s: float | None = None   # CPU seconds the seekgate process used meanwhile (seekgate rows)

    def fail(self, exc: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"[:300]


async def timed(call: Call, sample: Sample) -> float:
    t0 = time.perf_counter()
    try:
        await call()
    except Exception as exc:  # noqa: BLE001 - counted and reported
        sample.fail(exc)
        return time.perf_counter() - t0
    dt = time.perf_counter() - t0
    sample.latencies.append(dt)
    return dt


async def interleaved_c1(direct: Call, proxied: Call, duration: float, cpu: CpuClock) -> tuple[Sample, Sample]:
    """One caller, alternating sides call by call, for 2 x duration seconds in all."""
    d, s = Sample(), Sample()
    cpu0 = cpu()
    deadline = time.perf_counter() + 2 * duration
    i = 0
    while time.perf_counter() < deadline:
        order = ((direct, d), (proxied, s)) if i % 2 == 0 else ((proxied, s), (direct, d))
        for call, sample in order:
            sample.busy_s += await timed(call, sample)
        i += 1
    add_cpu(s, cpu0, cpu())   # seekgate is idle during the direct calls
    return d, s


async def closed_loop(call: Call, concurrency: int, seconds: float, sample: Sample) -> None:
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await timed(call, sample)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    # Requests in flight at the deadline finish and count; so does their time.
    sample.busy_s += time.perf_counter() - start


async def abba(direct: Call, proxied: Call, concurrency: int, duration: float,
               cpu: CpuClock) -> tuple[Sample, Sample]:
    d, s = Sample(), Sample()
    half = duration / 2
    for call, sample in ((direct, d), (proxied, s), (proxied, s), (direct, d)):
        cpu0 = cpu() if sample is s else None
        await closed_loop(call, concurrency, half, sample)
        if sample is s:
            add_cpu(s, cpu0, cpu())
    return d, s


async def warm_up(call: Call, what: str) -> None:
    for _ in range(3):
        await call()   # a failure here is a set-up problem: let it surface
    sample = Sample()
    await closed_loop(call, HIGH, WARMUP_S, sample)
    if sample.errors:
        raise RuntimeError(f"warm-up of {what} failed: {sample.first_error}")


def row(protocol: str, concurrency: int, path: str, sample: Sample) -> dict[str, Any]:
    lat = sorted(sample.latencies)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {
        "protocol": protocol, "concurrency": concurrency, "path": path,
        "requests": len(lat), "errors": sample.errors, "first_error": sample.first_error,
        "seconds": round(sample.busy_s, 3),
        "requests_per_s": round(len(lat) / sample.busy_s, 3) if sample.busy_s else None,
        "p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)),
        "seekgate_cpu_ms_per_request": (round(sample.cpu_s * 1000 / len(lat), 3)
                                        if sample.cpu_s is not None and lat else None),
        "seekgate_cpu_cores": (round(sample.cpu_s / sample.busy_s, 3)
                               if sample.cpu_s is not None and sample.busy_s and concurrency > 1 else None),
    }


def compare(direct: dict[str, Any], proxied: dict[str, Any]) -> None:
    dp, sp = direct["p50_ms"], proxied["p50_ms"]
    proxied["added_p50_ms"] = round(sp - dp, 3) if dp is not None and sp is not None else None
    dr, sr = direct["requests_per_s"], proxied["requests_per_s"]
    proxied["throughput_ratio"] = round(sr / dr, 4) if dr and sr is not None else None


async def bench(triton_http: str, triton_grpc: str, gate_http: str, gate_grpc: str, key: str,
                duration: float, cpu: CpuClock) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=HIGH + 4)) as s_direct, \
            aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=HIGH + 4)) as s_gate, \
            grpc.aio.insecure_channel(triton_grpc, options=options) as ch_direct, \
            grpc.aio.insecure_channel(gate_grpc, options=options) as ch_gate:
        protocols = {
            "grpc": (grpc_call(ch_direct, None), grpc_call(ch_gate, key)),
            "http": (http_call(s_direct, triton_http, None), http_call(s_gate, gate_http, key)),
        }
        for protocol, (direct, proxied) in protocols.items():
            print(f"  {protocol}: warm-up ...", file=sys.stderr, flush=True)
            await warm_up(direct, f"{protocol} direct")
            await warm_up(proxied, f"{protocol} seekgate")
            print(f"  {protocol}: concurrency 1, interleaved, {2 * duration:g}s ...", file=sys.stderr, flush=True)
            d, s = await interleaved_c1(direct, proxied, duration, cpu)
            pair = [row(protocol, 1, "direct", d), row(protocol, 1, "seekgate", s)]
            compare(*pair)
            rows += pair
            print(f"  {protocol}: concurrency {HIGH}, {duration:g}s per side (ABBA) ...", file=sys.stderr, flush=True)
            d, s = await abba(direct, proxied, HIGH, duration, cpu)
            pair = [row(protocol, HIGH, "direct", d), row(protocol, HIGH, "seekgate", s)]
            compare(*pair)
            rows += pair
    return rows


def fmt_table(rows: list[dict[str, Any]]) -> str:
    def num(v: float | None, spec: str) -> str:
        return "" if v is None else format(v, spec)

    header = (f"{'proto':<5} {'conc':>4} {'path':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'+p50 ms':>8} {'ratio':>6} {'gate cpu':>8} {'reqs':>6} {'err':>4}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['protocol']:<5} {r['concurrency']:>4} {r['path']:<8} {num(r['requests_per_s'], '.1f'):>8} "
            f"{num(r['p50_ms'], '.2f'):>8} {num(r['p99_ms'], '.2f'):>8} "
            f"{num(r.get('added_p50_ms'), '+.2f'):>8} {num(r.get('throughput_ratio'), '.2f'):>6} "
            f"{num(r['seekgate_cpu_ms_per_request'], '.2f'):>8} "
            f"{r['requests']:>6} {r['errors']:>4}")
    return "\n".join(lines)


# ------------------------------------------------------------------ processes

def wait_live(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"seekgate serve exited with {proc.returncode}; log: {log}\n"
                               + log.read_text(errors="replace")[-2000:])
        try:
            with urllib.request.urlopen(url + "/v2/health/live", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"seekgate not live after {timeout:.0f}s; log: {log}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0,
                   help="seconds per side per concurrency level (default 5)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--model-repository", type=Path, default=REPO / "triton_models")
    args = p.parse_args(argv)
    if args.duration <= 0:
        p.error("--duration must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from proxy.local.tinymodel import build_tiny_checkpoint
    from proxy.local.triton import TritonLaunch, TritonProcess, free_ports

    # The Python backend stub finds its interpreter as `python3` on PATH (see README).
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="seekgate-overhead-")))
        print("building tiny checkpoint ...", file=sys.stderr, flush=True)
        checkpoint = build_tiny_checkpoint(tmp / "deepseek-tiny", seed=0)
        t_http, t_grpc, t_metrics, g_http, g_grpc, g_metrics = free_ports(6)
        launch = TritonLaunch(args.model_repository, tmp / "triton-data", checkpoint, http_port=t_http,
                              grpc_port=t_grpc, metrics_port=t_metrics, config_name="default",
                              startup_timeout_s=180)
        print(f"starting tritonserver on 127.0.0.1:{t_http} ...", file=sys.stderr, flush=True)
        triton = stack.enter_context(TritonProcess(launch))

        config = tmp / "seekgate.yaml"
        config.write_text(yaml.safe_dump({
            "data_dir": str(tmp / "seekgate-data"),
            "server": {"http_port": g_http, "grpc_port": g_grpc, "metrics_port": g_metrics},
            "upstream": {"http_url": triton.http_url, "grpc_target": f"127.0.0.1:{t_grpc}"},
            "policy": {"directory": str(REPO / "policies")},
        }))
        made = subprocess.run(
            [sys.executable, "-m", "proxy", "keys", "create", "--config", str(config), "--tier", "user",
             "--name", "bench", "--role", "user", "--expires", "1d", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            raise RuntimeError(f"keys create failed ({made.returncode}): {made.stderr.strip()}")
        key = json.loads(made.stdout)["key"]

        log_path = tmp / "seekgate.log"
        with open(log_path, "wb") as log:
            gate = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(stop_process, gate)
        gate_http = f"http://127.0.0.1:{g_http}"
        print(f"starting seekgate on 127.0.0.1:{g_http} ...", file=sys.stderr, flush=True)
        wait_live(gate_http, gate, log_path)

        rows = asyncio.run(bench(triton.http_url, f"127.0.0.1:{t_grpc}", gate_http, f"127.0.0.1:{g_grpc}",
                                 key, args.duration, process_cpu(gate.pid)))

    print(f"\nseekgate vs direct Triton, model {MODEL}, max_tokens 1, {args.duration:g}s per side per level "
          f"(c1: interleaved; c{HIGH}: closed loop, ABBA rounds)")
    print(fmt_table(rows))
    print("+p50 ms = seekgate p50 - direct p50; ratio = seekgate req/s / direct req/s; "
          "gate cpu = CPU ms the seekgate process used per request")
    for r in rows:
        if r["errors"]:
            print(f"errors on {r['protocol']} c{r['concurrency']} {r['path']}: {r['errors']}, first: {r['first_error']}")
    if args.json:
        doc = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count()},
            "model": MODEL, "prompt": PROMPT, "max_tokens": 1, "duration_s": args.duration,
            "concurrency": [1, HIGH],
            "method": {"1": "one caller alternating direct/seekgate calls for 2 x duration",
                       str(HIGH): "closed loop, duration/2 rounds in order direct, seekgate, seekgate, direct"},
            "results": rows,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
