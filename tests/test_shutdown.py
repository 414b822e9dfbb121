"""SIGTERM under load: every request that got an answer has its audit record on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from proxy.triton import TritonProcess
from tests.conftest import REPO, free_ports
from tests.gateway import Gateway, wait_for


def serve(tmp_path: Path, triton: TritonProcess, **server: float) -> tuple[subprocess.Popen[bytes], str, str]:
    """`seekgate serve` as its own process over a fresh data dir, and a key issued the way ops would."""
    http, grpc_, metrics = free_ports(3)
    config = tmp_path / "seekgate.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "server": {"http_port": http, "grpc_port": grpc_, "metrics_port": metrics, **server},
        "upstream": {"http_url": triton.http_url, "grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"},
        "policy": {"directory": str(REPO / "policies")},
    }))
    _, key = Gateway(tmp_path, triton.http_url, [http, grpc_, metrics], data_dir=str(tmp_path / "data")).key()
    # A file, not a pipe nobody reads: a full pipe would block the server mid-test.
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], cwd=REPO,
                            stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{http}", key


def test_sigterm_under_load_loses_no_audit_record(triton: TritonProcess, tmp_path: Path) -> None:
    server, url, key = serve(tmp_path, triton)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/v2/health/live", timeout=1)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        answered: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client() -> None:
            body = json.dumps({"text_input": "load", "max_tokens": 8}).encode()
            while not stop.is_set():
                req = urllib.request.Request(url + "/v2/models/deepseek/generate", data=body, method="POST",
                                             headers={"Authorization": f"Bearer {key}"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        rid = r.headers["X-Request-Id"]
                        r.read()
                except urllib.error.HTTPError as e:
                    rid = e.headers.get("X-Request-Id")
                except (urllib.error.URLError, OSError, ConnectionError):
                    continue   # refused after shutdown began: never answered, nothing to audit
                if rid:
                    with lock:
                        answered.append(rid)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(3)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if server.poll() is None:
            server.kill()
    audit_file = tmp_path / "data" / "audit" / "audit.jsonl"
    recorded = {json.loads(line)["request_id"] for line in audit_file.read_text().splitlines() if line.strip()}
    assert len(answered) > 20
    assert set(answered) <= recorded


def test_sigterm_fails_readiness_at_once_and_lets_a_stream_finish(triton: TritonProcess, tmp_path: Path) -> None:
    server, url, key = serve(tmp_path, triton, shutdown_delay_s=1.0, drain_timeout_s=20.0)

    def ready() -> int:
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0
    try:
        assert wait_for(lambda: ready() == 200, 30)

        def open_stream() -> Any:
            req = urllib.request.Request(url + "/v2/models/deepseek_stream/generate_stream", method="POST",
                                         data=json.dumps({"text_input": "drain", "max_tokens": 48}).encode(),
                                         headers={"Authorization": f"Bearer {key}"})
            return urllib.request.urlopen(req, timeout=60)

        def events(raw: bytes) -> list[dict[str, Any]]:
            return [json.loads(line[5:]) for line in raw.splitlines() if line.startswith(b"data:")]
        with open_stream() as whole:   # greedy decoding: the reference for the drained stream
            expected = events(whole.read())
        assert len(expected) > 5
        stream = open_stream()
        first = stream.readline()   # the stream is under way
        assert first.startswith(b"data:")
        server.send_signal(signal.SIGTERM)
        assert wait_for(lambda: ready() == 503, 1.0)   # at once, while still taking requests
        got = events(first + stream.read())   # no reset: the stream runs to its end
        assert got == expected
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    audit_file = tmp_path / "data" / "audit" / "audit.jsonl"
    streams = [json.loads(line) for line in audit_file.read_text().splitlines()
               if '"deepseek_stream"' in line]
    assert len(streams) == 2 and all(r["http_status"] == 200 for r in streams)
    assert streams[1]["output_tokens"] == expected[-1]["output_tokens"]
