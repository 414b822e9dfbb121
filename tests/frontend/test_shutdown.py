"""SIGTERM under load: every request that got an answer has its audit record on disk."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.local.triton import TritonProcess
from tests.conftest import REPO, free_ports
from tests.gateway import Gateway, wait_for
from tests.relay import TcpRelay


def serve(tmp_path: Path, triton: TritonProcess, upstream_http: str | None = None,
          **server: float) -> tuple[subprocess.Popen[bytes], str, str]:
    """`seekgate serve` as its own process over a fresh data dir, and a key issued the way ops would."""
    upstream_http = upstream_http or triton.http_url
    http, grpc_, metrics = free_ports(3)
    config = tmp_path / "seekgate.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "server": {"http_port": http, "grpc_port": grpc_, "metrics_port": metrics, **server},
        "upstream": {"http_url": upstream_http, "grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"},
        "policy": {"directory": str(REPO / "policies")},
    }))
    _, key = Gateway(tmp_path, upstream_http, [http, grpc_, metrics], data_dir=str(tmp_path / "data")).key()
    # A file, not a pipe nobody reads: a full pipe would block the server mid-test.
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], cwd=REPO,
                            stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{http}", key


class LoadClients:
    """Clients hammering generate until stopped, sorting every failure by what it means for a proxy.

    A refused connection is what a client must see once the listener is closed: nothing was
    sent. A reset, an answer that never came or one cut short, on a request that went out, is
    the broken promise this module tests for. Half the clients open a connection per request
    (urllib), half reuse one keep-alive connection (http.client) as pooled SDK clients do.
    """

    def __init__(self, url: str, key: str, count: int = 8) -> None:
        self.host, port = url.rsplit("/", 1)[1].split(":")
        self.port = int(port)
        self.url, self.key = url, key
        self.answered: list[str] = []
        self.refused = 0
        self.broken: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._fresh if i % 2 else self._keep_alive) for i in range(count)]
        self._body = json.dumps({"text_input": "load", "max_tokens": 8}).encode()

    def __enter__(self) -> LoadClients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _answered(self, rid: str | None) -> None:
        with self._lock:
            if rid:
                self.answered.append(rid)
            else:
                self.broken.append("an answer without X-Request-Id")

    def _fail(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self.broken.append(f"{what}: {type(exc).__name__}: {exc}")

    def _fresh(self) -> None:
        while not self._stop.is_set():
            req = urllib.request.Request(self.url + "/v2/models/deepseek/generate", data=self._body,
                                         method="POST", headers={"Authorization": f"Bearer {self.key}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    rid = r.headers["X-Request-Id"]
                    r.read()
            except urllib.error.HTTPError as e:
                rid = e.headers.get("X-Request-Id")
            except urllib.error.URLError as e:
                if isinstance(e.reason, ConnectionRefusedError):   # the listener is closed: nothing sent
                    with self._lock:
                        self.refused += 1
                    time.sleep(0.05)
                    continue
                self._fail("new connection", e)
                return
            except (OSError, http.client.HTTPException) as e:
                self._fail("new connection", e)
                return
            self._answered(rid)

    def _keep_alive(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        while not self._stop.is_set():
            reused = conn.sock is not None
            try:
                conn.request("POST", "/v2/models/deepseek/generate", self._body,
                             {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                conn.close()
                time.sleep(0.05)
                continue
            except OSError as e:
                self._fail("sending on a " + ("reused" if reused else "new") + " connection", e)
                return
            try:
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException) as e:
                self._fail("answer on a " + ("reused" if reused else "new") + " connection", e)
                return
            self._answered(r.headers["X-Request-Id"])
            # http.client reconnects by itself after an answer that says Connection: close.


def wait_live(url: str) -> None:
    assert wait_for(lambda: _live(url), 30)


def _live(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/v2/health/live", timeout=1)
        return True
    except (urllib.error.URLError, OSError):
        return False


def audited(tmp_path: Path) -> set[str]:
    audit_file = tmp_path / "data" / "audit" / "audit.jsonl"
    return {json.loads(line)["request_id"] for line in audit_file.read_text().splitlines() if line.strip()}


def test_sigterm_under_load_loses_no_audit_record_and_resets_no_request(triton: TritonProcess,
                                                                         tmp_path: Path) -> None:
    # As deployed: a shutdown delay for load balancers to move away before the listener closes.
    server, url, key = serve(tmp_path, triton, shutdown_delay_s=1.0, drain_timeout_s=20.0)
    try:
        wait_live(url)
        with LoadClients(url, key) as clients:
            # Load first, however slow the machine: the shutdown must meet requests in flight.
            assert wait_for(lambda: len(clients.answered) >= 20, 60), clients.broken
            server.send_signal(signal.SIGTERM)
            assert server.wait(60) == 0
            assert wait_for(lambda: clients.refused > 0, 10)   # the clients have met the closed listener
    finally:
        if server.poll() is None:
            server.kill()
    assert clients.broken == []
    assert len(clients.answered) >= 20
    assert set(clients.answered) <= audited(tmp_path)


def open_stream(url: str, key: str, text: str = "drain", max_tokens: int = 48) -> Any:
    req = urllib.request.Request(url + "/v2/models/deepseek_stream/generate_stream", method="POST",
                                 data=json.dumps({"text_input": text, "max_tokens": max_tokens}).encode(),
                                 headers={"Authorization": f"Bearer {key}"})
    return urllib.request.urlopen(req, timeout=60)


def events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in raw.splitlines() if line.startswith(b"data:")]


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

        with open_stream(url, key) as whole:   # greedy decoding: the reference for the drained stream
            expected = events(whole.read())
        assert len(expected) > 5
        stream = open_stream(url, key)
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


def test_a_stream_outliving_the_drain_timeout_is_cut_audited_and_the_process_exits(triton: TritonProcess,
                                                                                    tmp_path: Path) -> None:
    drain_timeout_s = 2.0
    relay = TcpRelay("127.0.0.1", triton.launch.http_port).start()
    server, url, key = serve(tmp_path, triton, f"http://127.0.0.1:{relay.port}", shutdown_delay_s=0.5,
                             drain_timeout_s=drain_timeout_s)
    try:
        wait_live(url)
        relay.hold_after(b"data:")   # Triton's later events wait in the relay: the stream outlives the drain
        stream = open_stream(url, key, "outlive the drain", 200)
        assert stream.readline().startswith(b"data:")
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(drain_timeout_s + 15) == 0
        took = time.monotonic() - signalled
        with pytest.raises(http.client.IncompleteRead):   # cut: the chunked body never got its end
            stream.read()
    finally:
        relay.stop()
        if server.poll() is None:
            server.kill()
    # The stream had its drain time and not much more (the margin: closing the store and audit log).
    assert 0.5 + drain_timeout_s <= took < 0.5 + drain_timeout_s + 3
    audit_file = tmp_path / "data" / "audit" / "audit.jsonl"
    (cut,) = [json.loads(line) for line in audit_file.read_text().splitlines() if '"deepseek_stream"' in line]
    assert cut["status"] == "error" and cut["reason"] == "drain_timeout" and cut["http_status"] == 499
