"""Drives one HTTP endpoint with `wrk` (or `hey`) for a while and returns req/s and latency percentiles."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

INSTALL_HINT = ("install wrk (Debian/Ubuntu: `apt-get install wrk`, or scripts/system-packages) "
                "or hey (`apt-get install hey`)")
_WRK_MARK = "BENCHJSON "


@dataclass(frozen=True)
class Load:
    """What to send: one POST, the same every time, so Triton can batch them."""

    url: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


@dataclass
class Measured:
    tool: str
    concurrency: int
    requests: int          # completed responses, any status
    errors: int            # non-2xx/3xx responses, socket errors and timeouts
    seconds: float
    requests_per_s: float  # successful responses per second
    p50_ms: float | None
    p99_ms: float | None
    first_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def find_tool(preferred: str = "auto") -> tuple[str, str]:
    """(name, path) of the load generator: wrk first, then hey; RuntimeError with the install hint."""
    names = ("wrk", "hey") if preferred == "auto" else (preferred,)
    for name in names:
        path = shutil.which(name)
        if path:
            return name, path
    raise RuntimeError(f"no load generator found ({' or '.join(names)}): {INSTALL_HINT}")


def _lua_string(data: bytes) -> str:
    # A long bracket with a level no body contains: the body goes in byte for byte.
    text = data.decode()
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def wrk_script(load: Load) -> str:
    """The Lua script: the POST body and headers, and a done() that prints exact figures as JSON."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(load.body)}"]
    lines += [f"wrk.headers[ {_lua_string(k.encode())} ] = {_lua_string(v.encode())}" for k, v in load.headers]
    lines.append(f"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{_WRK_MARK}{{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
""")
    return "\n".join(lines)


def parse_wrk(output: str, concurrency: int) -> Measured:
    """The done() line of wrk_script's output."""
    line = next((ln for ln in output.splitlines() if ln.startswith(_WRK_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {output.strip()[-500:]}")
    d = json.loads(line[len(_WRK_MARK):])
    socket_errors = d["connect"] + d["read"] + d["write"] + d["timeout"]
    errors = d["status"] + socket_errors
    seconds = d["duration_us"] / 1e6
    first = None
    if errors:
        first = (f"{d['status']} non-2xx/3xx responses; socket errors: connect {d['connect']}, "
                 f"read {d['read']}, write {d['write']}, timeout {d['timeout']}")
    ok = max(0, d["requests"] - d["status"])
    return Measured("wrk", concurrency, d["requests"], errors, round(seconds, 3),
                    round(ok / seconds, 2) if seconds else 0.0,
                    d["p50_us"] / 1000 if d["requests"] else None,
                    d["p99_us"] / 1000 if d["requests"] else None, first)


def run_wrk(path: str, load: Load, concurrency: int, seconds: float, timeout_s: float = 60) -> Measured:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(wrk_script(load))
        threads = max(1, min(concurrency, os.cpu_count() or 1))
        cmd = [path, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
               f"--timeout={timeout_s:g}s", "--latency", "-s", str(script), load.url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    return parse_wrk(done.stdout, concurrency)


def parse_hey_csv(output: str, concurrency: int, seconds: float) -> Measured:
    """hey -o csv: one row per response, `response-time` (s) first and `status-code` seventh."""
    latencies, errors, total = [], 0, 0
    for line in output.splitlines():
        cells = line.split(",")
        if len(cells) < 7 or not cells[0][:1].isdigit():
            continue   # the header row
        total += 1
        if 200 <= int(cells[6]) < 400:
            latencies.append(float(cells[0]) * 1000)
        else:
            errors += 1
    latencies.sort()
    return Measured("hey", concurrency, total, errors, seconds, round(len(latencies) / seconds, 2) if seconds else 0.0,
                    percentile(latencies, 50), percentile(latencies, 99),
                    f"{errors} non-2xx/3xx responses" if errors else None)


def run_hey(path: str, load: Load, concurrency: int, seconds: float, timeout_s: float = 60) -> Measured:
    with tempfile.TemporaryDirectory(prefix="bench-hey-") as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(load.body)
        cmd = [path, "-z", f"{max(1, round(seconds))}s", "-c", str(concurrency), "-m", "POST",
               "-t", str(int(timeout_s)), "-D", str(body), "-o", "csv"]
        for k, v in load.headers:
            cmd += ["-T", v] if k.lower() == "content-type" else ["-H", f"{k}: {v}"]
        done = subprocess.run(cmd + [load.url], capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    if done.returncode != 0:
        raise RuntimeError(f"hey failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    # hey's CSV has no totals: the wall time is the -z duration it was given.
    return parse_hey_csv(done.stdout, concurrency, float(max(1, round(seconds))))


def measure(tool: tuple[str, str], load: Load, concurrency: int, seconds: float) -> Measured:
    name, path = tool
    return (run_wrk if name == "wrk" else run_hey)(path, load, concurrency, seconds)


def combine(runs: list[Measured]) -> Measured:
    """Rounds of one cell as one: counts and time summed, req/s over the summed time, the rounds' median p50/p99."""
    if not runs:
        raise ValueError("no rounds to combine")
    seconds = sum(m.seconds for m in runs)
    ok = sum(m.requests_per_s * m.seconds for m in runs)

    def median(values: list[float | None]) -> float | None:
        known = sorted(v for v in values if v is not None)
        return statistics.median(known) if known else None
    return Measured(runs[0].tool, runs[0].concurrency, sum(m.requests for m in runs), sum(m.errors for m in runs),
                    round(seconds, 3), round(ok / seconds, 2) if seconds else 0.0,
                    median([m.p50_ms for m in runs]), median([m.p99_ms for m in runs]),
                    next((m.first_error for m in runs if m.first_error), None))


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]
