"""The processes a benchmark runs: real Triton on the bench's model repository, seekgate, the passthrough."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from proxy.local.triton import TritonLaunch, TritonProcess, free_ports

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
POLICY_DIR = BENCH / "policies"
# The key the bench sends: what bench/policies/bench50.yaml's rule `bench-loopback` asks for.
BENCH_ROLES = ("bench",)
BENCH_LABELS = {"team": "perf", "env": "bench"}
BENCH_MODELS = ("trivial", "deepseek")


class Unavailable(RuntimeError):
    """A path that could not be started (e.g. `serve --workers` not there yet); reported, not fatal."""


@dataclass
class Service:
    """One server process the bench talks to over HTTP."""

    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def model_repository(root: Path) -> Path:
    """A repository holding triton_models/deepseek and bench/models/trivial side by side (symlinks).

    The bench's own model stays out of triton_models/, which is what deployments serve.
    """
    repo = root / "models"
    repo.mkdir(parents=True, exist_ok=True)
    for name, source in (("deepseek", REPO / "triton_models" / "deepseek"),
                         ("trivial", BENCH / "models" / "trivial")):
        link = repo / name
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
    return repo


def triton_on_bench_models(root: Path, checkpoint: Path) -> TritonProcess:
    """The real tritonserver (CPU config.pbtxt) serving deepseek and trivial; the caller stops it."""
    http, grpc_, metrics = free_ports(3)
    launch = TritonLaunch(model_repository(root), root / "triton-data", checkpoint, http_port=http,
                          grpc_port=grpc_, metrics_port=metrics, config_name="default", startup_timeout_s=180)
    return TritonProcess(launch).__enter__()


def upstream_of(triton: TritonProcess) -> dict[str, str]:
    """The `upstream` config section pointing at a TritonProcess."""
    t = triton.launch
    return {"http_url": triton.http_url, "grpc_target": f"{t.host}:{t.grpc_port}"}


def seekgate_config(root: Path, upstream: dict[str, str], policy_dir: Path = POLICY_DIR) -> Path:
    """A config for one seekgate: its own data dir and ports, keys + policy + audit + metrics on."""
    http, grpc_, metrics = free_ports(3)
    config = root / "seekgate.yaml"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({
        "data_dir": str(root / "data"),
        "server": {"http_port": http, "grpc_port": grpc_, "metrics_port": metrics},
        "upstream": upstream,
        "policy": {"directory": str(policy_dir)},
    }))
    return config


def create_key(config: Path, name: str = "bench") -> str:
    """The bench key, issued by the CLI (`seekgate keys create`) into the config's data dir."""
    cmd = [sys.executable, "-m", "proxy", "keys", "create", "--config", str(config), "--tier", "user",
           "--name", name, "--expires", "1d", "--json"]
    cmd += [a for r in BENCH_ROLES for a in ("--role", r)]
    cmd += [a for k, v in BENCH_LABELS.items() for a in ("--label", f"{k}={v}")]
    cmd += [a for m in BENCH_MODELS for a in ("--model", m)]
    made = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        raise RuntimeError(f"keys create failed ({made.returncode}): {made.stderr.strip()}")
    return str(json.loads(made.stdout)["key"])


def start_seekgate(config: Path, workers: int = 1) -> Service:
    """`python -m proxy serve` as a subprocess; Unavailable if it exits before it is live."""
    settings = yaml.safe_load(config.read_text())
    url = f"http://127.0.0.1:{settings['server']['http_port']}"
    log = config.parent / f"seekgate-w{workers}.log"
    cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return live(Service(f"seekgate x{workers}", url, proc, log))


def start_passthrough(upstream: str, log: Path) -> Service:
    """bench/passthrough.py as a subprocess in front of `upstream`, its output in `log`."""
    (port,) = free_ports(1)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench.passthrough", "--port", str(port),
                                 "--upstream", upstream], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return live(Service("passthrough", f"http://127.0.0.1:{port}", proc, log))


def live(service: Service) -> Service:
    """`service` once it answers its liveness probe; stopped (and the error raised) if it never does."""
    try:
        wait_live(service)
    except BaseException:
        service.stop()
        raise
    return service


def wait_live(service: Service, timeout: float = 60) -> None:
    """Until GET /v2/health/live answers 200 (the passthrough asks Triton); Unavailable if the process exits."""
    deadline = time.monotonic() + timeout
    proc = service.proc
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"{service.name} exited with {proc.returncode}: {_last_line(service)}")
        try:
            with urllib.request.urlopen(service.url + "/v2/health/live", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise Unavailable(f"{service.name} not live after {timeout:.0f}s: {_last_line(service)}")


def _last_line(service: Service) -> str:
    text = service.log.read_text(errors="replace") if service.log is not None and service.log.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """On uvloop, as `seekgate serve` runs; without touching the global event loop policy."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree_cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of a process and its live descendants (workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}   # pid -> (ppid, cpu seconds)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    if pid not in stats:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in stats.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(stats[p][1] for p in tree)


def completed(triton_url: str, model: str) -> int:
    """Requests Triton has finished on `model` (success + failure), from its statistics API."""
    with urllib.request.urlopen(f"{triton_url}/v2/models/{model}/stats", timeout=5) as r:
        stats = json.load(r)["model_stats"]
    return sum(int(s["inference_stats"][k]["count"]) for s in stats for k in ("success", "fail"))


def wait_idle(triton_url: str, model: str, quiet_s: float = 0.3, timeout: float = 120) -> None:
    """Until Triton finishes nothing more on `model` for `quiet_s`.

    A load generator stops at its deadline with requests in flight, and Triton still
    runs them: without this, a slow model's leftovers eat into the next cell.
    """
    deadline = time.monotonic() + timeout
    last = completed(triton_url, model)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = completed(triton_url, model)
        if now == last:
            return
        last = now
