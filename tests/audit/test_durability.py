"""Audit durability end to end: kill -9 in strict and batched mode, torn lines, an unwritable audit log."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from aiohttp import web
from tritonclient.grpc import service_pb2_grpc

from proxy.audit import jsonl as audit_file
from proxy.audit.writer import AuditWriter, build_record
from proxy.context import RequestContext
from proxy.frontend.grpc import GrpcFrontEnd
from proxy.local.triton import TritonProcess
from tests.conftest import REPO, free_ports
from tests.frontend.test_grpc import STREAM_MODEL, infer_request, md
from tests.gateway import Gateway
from tests.relay import TcpRelay

GENERATE = "/v2/models/deepseek/generate"
_REAL_WRITE = audit_file._write_all


def _records(data_dir: Path) -> list[dict[str, Any]]:
    """Every parseable line of audit.jsonl (a crash may leave the last one torn)."""
    out = []
    for line in (data_dir / "audit" / "audit.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _post(url: str, key: str, body: dict[str, Any], timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ------------------------------------------------------------------ kill -9 of `seekgate serve`

def _serve(tmp_path: Path, triton: TritonProcess, durability: str) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    http, grpc_, metrics = free_ports(3)
    config = tmp_path / "seekgate.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "server": {"http_port": http, "grpc_port": grpc_, "metrics_port": metrics},
        "upstream": {"http_url": triton.http_url, "grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"},
        "policy": {"directory": str(REPO / "policies")},
        "audit": {"durability": durability},
    }))
    _, key = Gateway(tmp_path, triton.http_url, [http, grpc_, metrics], data_dir=str(tmp_path / "data")).key()
    server = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/v2/health/live", timeout=1)
            return server, url, key, config
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    server.kill()
    raise AssertionError("seekgate serve did not start")


def _load_then_kill(server: subprocess.Popen[bytes], url: str, key: str, seconds: float = 3.0,
                    at_least: int = 60, older_than: float = 0.0) -> tuple[list[tuple[str, float]], float]:
    """8 clients in a loop; SIGKILL after `seconds` and once `at_least` answers are `older_than` seconds
    old (counted, not timed: a busy machine answers slower).

    Returns (request id, monotonic time answered) per answer, and the kill time.
    """
    answered: list[tuple[str, float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, headers, _ = _post(url + GENERATE, key, {"text_input": "crash", "max_tokens": 1})
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                continue   # cut by the kill: never answered
            if status == 200:
                with lock:
                    answered.append((headers["X-Request-Id"], time.monotonic()))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(seconds)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            settled = time.monotonic() - older_than
            with lock:
                if sum(1 for _, at in answered if at < settled) >= at_least:
                    break
            time.sleep(0.1)
        killed_at = time.monotonic()
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    finally:
        stop.set()
        if server.poll() is None:
            server.kill()
        for t in threads:
            t.join(30)
    return answered, killed_at


def test_kill_9_in_strict_mode_keeps_every_answered_record(triton: TritonProcess, tmp_path: Path) -> None:
    server, url, key, config = _serve(tmp_path, triton, "strict")
    answered, _ = _load_then_kill(server, url, key)
    recorded = {r["request_id"] for r in _records(tmp_path / "data")}
    assert len(answered) > 50
    missing = {rid for rid, _ in answered} - recorded
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no record"
    # The log stays readable after the crash, and the next writer starts on a fresh line.
    for args in (["audit", "tail", "-n", "5"], ["audit", "query", "--limit", "5"]):
        out = subprocess.run([sys.executable, "-m", "proxy", *args, "--config", str(config)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.splitlines()) == 5
    _restart_and_append(tmp_path / "data")


def test_kill_9_in_batched_mode_loses_at_most_the_window(triton: TritonProcess, tmp_path: Path) -> None:
    server, url, key, _ = _serve(tmp_path, triton, "batched")
    answered, killed_at = _load_then_kill(server, url, key, older_than=0.5)
    recorded = {r["request_id"] for r in _records(tmp_path / "data")}
    # The fsync window is 100 ms; on a 2-core machine shared with Triton and the load
    # generator the writer task can also lag behind the responses, so allow 0.5 s in all.
    older = [rid for rid, at in answered if at < killed_at - 0.5]
    assert len(older) > 50
    assert set(older) <= recorded
    _restart_and_append(tmp_path / "data")


def _restart_and_append(data_dir: Path) -> None:
    import asyncio

    async def go() -> None:
        async with AuditWriter(data_dir) as writer:
            writer.submit(build_record(RequestContext(request_id="after-restart", client_ip="127.0.0.1")))
    asyncio.run(go())
    last = (data_dir / "audit" / "audit.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["request_id"] == "after-restart"


def test_cli_reads_past_a_torn_last_line(tmp_path: Path) -> None:
    import asyncio

    async def go() -> None:
        async with AuditWriter(tmp_path) as writer:
            for i in range(3):
                writer.submit(build_record(RequestContext(request_id=f"req-{i}", client_ip="10.0.0.1")))
    asyncio.run(go())
    with (tmp_path / "audit" / "audit.jsonl").open("a") as f:
        f.write('{"timestamp":"2026-01-01T00:00:00.000Z","event_id":"torn","reque')
    for args, want in ((["audit", "tail", "-n", "10"], ["req-0", "req-1", "req-2"]),
                       (["audit", "query"], ["req-2", "req-1", "req-0"])):
        out = subprocess.run([sys.executable, "-m", "proxy", *args, "--data-dir", str(tmp_path)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert [json.loads(line)["request_id"] for line in out.stdout.splitlines()] == want


# ------------------------------------------------------------------ an unwritable audit log, in process

@pytest.fixture
def relay(triton: TritonProcess) -> Iterator[TcpRelay]:
    r = TcpRelay("127.0.0.1", triton.launch.http_port).start()
    yield r
    r.stop()


def _gateway(tmp_path: Path, triton: TritonProcess, upstream: str, durability: str, **more: Any) -> Gateway:
    return Gateway(tmp_path, upstream, free_ports(3), **{
        "audit.durability": durability, "upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}",
        **more})


def _disk_full(fd: int, data: bytes) -> None:
    raise OSError(28, "No space left on device")


def test_strict_mode_refuses_with_503_while_the_audit_log_is_unwritable(
        triton: TritonProcess, relay: TcpRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = _gateway(tmp_path, triton, f"http://127.0.0.1:{relay.port}", "strict")
    _, key = gw.key()
    gw.start()
    try:
        status, headers, _ = _post(gw.url + GENERATE, key, {"text_input": "ok", "max_tokens": 2})
        assert status == 200
        # Strict: the record is on disk, with its token counts, by the time the client has the answer.
        rec = next(r for r in _records(gw.data_dir) if r["request_id"] == headers["X-Request-Id"])
        assert rec["http_status"] == 200 and rec["output_tokens"] == 2

        monkeypatch.setattr(audit_file, "_write_all", _disk_full)
        # The writer still believes the disk is fine: the stream goes out, but its end is withheld.
        conn = http.client.HTTPConnection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]), timeout=30)
        conn.request("POST", "/v2/models/deepseek_stream/generate_stream",
                     json.dumps({"text_input": "cut", "max_tokens": 4}), {"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
        # Now it is known to be unwritable: refused before Triton sees a byte.
        relay.clear()
        status, headers, body = _post(gw.url + GENERATE, key, {"text_input": "refused", "max_tokens": 2})
        assert status == 503 and headers.get("Retry-After") == "1"
        assert b"audit" not in body   # the reason stays in the audit record
        assert GENERATE.encode() not in relay.seen()

        monkeypatch.setattr(audit_file, "_write_all", _REAL_WRITE)
        deadline = time.monotonic() + 10   # the refusals' own records, written again, bring it back
        while (status := _post(gw.url + GENERATE, key, {"text_input": "back", "max_tokens": 1})[0]) != 200:
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        gw.stop()
    reasons = [r["reason"] for r in _records(gw.data_dir)]
    assert "audit_unwritable" in reasons
    assert any(r.startswith("stream_cut: audit_write_failed") for r in reasons)


def test_batched_mode_keeps_serving_and_alerts_while_the_audit_log_is_unwritable(
        triton: TritonProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    gw = _gateway(tmp_path, triton, triton.http_url, "batched")
    _, key = gw.key()
    gw.start()
    ids = []
    try:
        monkeypatch.setattr(audit_file, "_write_all", _disk_full)
        with caplog.at_level(logging.ERROR, logger="proxy.audit"):
            for _ in range(3):
                status, headers, _ = _post(gw.url + GENERATE, key, {"text_input": "on", "max_tokens": 1})
                assert status == 200
                ids.append(headers["X-Request-Id"])
            time.sleep(0.3)
            metrics = urllib.request.urlopen(gw.metrics_url).read().decode()
        errors = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("seekgate_audit_write_errors_total")]
        assert errors and errors[0] >= 1
        assert "AUDIT WRITE FAILED" in caplog.text
        monkeypatch.setattr(audit_file, "_write_all", _REAL_WRITE)
    finally:
        gw.stop()
    # Held and retried, never dropped: every record lands once the disk is back.
    assert set(ids) <= {r["request_id"] for r in _records(gw.data_dir)}


def test_a_backlog_over_queue_max_refuses_new_requests_and_memory_stays_bounded(
        triton: TritonProcess, relay: TcpRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    gw = _gateway(tmp_path, triton, f"http://127.0.0.1:{relay.port}", "batched", **{"audit.queue_max": 5})
    _, key = gw.key()
    gw.start()
    served = []
    try:
        monkeypatch.setattr(audit_file, "_write_all", _disk_full)   # the writer holds everything
        for _ in range(10):   # served while the backlog (these, plus the key's expiry notice) is under 5
            status, headers, _ = _post(gw.url + GENERATE, key, {"text_input": "held", "max_tokens": 1})
            if status != 200:
                break
            served.append(headers["X-Request-Id"])
        assert status == 503 and 2 <= len(served) <= 5
        relay.clear()
        with caplog.at_level(logging.ERROR, logger="proxy.audit"):
            for _ in range(20):   # over the cap: refused before Triton; past 2x refusals are counted only
                status, headers, _ = _post(gw.url + GENERATE, key, {"text_input": "backlog", "max_tokens": 1})
                assert status == 503 and headers.get("Retry-After")
        assert b"backlog" not in relay.seen()
        depth = [float(line.split()[-1]) for line in urllib.request.urlopen(gw.metrics_url).read().decode()
                 .splitlines() if line.startswith("seekgate_audit_queue_depth")]
        assert depth and depth[0] <= 10   # 2 x queue_max: not one record per refused request
        assert "AUDIT BACKLOG" in caplog.text
        monkeypatch.setattr(audit_file, "_write_all", _REAL_WRITE)
        deadline = time.monotonic() + 20   # the writer's retry backoff is at most 5 s
        while _post(gw.url + GENERATE, key, {"text_input": "back", "max_tokens": 1})[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        gw.stop()
    records = _records(gw.data_dir)
    assert set(served) <= {r["request_id"] for r in records}   # served requests: never dropped
    assert any(r["reason"] == "audit_backlog" for r in records)


def test_strict_mode_streams_and_grpc_have_their_record_before_the_response_ends(
        triton: TritonProcess, tmp_path: Path) -> None:
    gw = _gateway(tmp_path, triton, triton.http_url, "strict")
    _, key = gw.key()
    gw.start()
    try:
        status, headers, body = _post(gw.url + "/v2/models/deepseek_stream/generate_stream", key,
                                      {"text_input": "stream", "max_tokens": 3})
        assert status == 200 and body.count(b"data:") == 3
        rec = next(r for r in _records(gw.data_dir) if r["request_id"] == headers["X-Request-Id"])
        assert rec["status"] == "allowed" and rec["output_tokens"] == 3

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gw.settings.server.grpc_port}")
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hello"]], dtype=object))
        tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[2]], dtype=np.int32))
        client.infer("deepseek", [text, tokens], headers={"authorization": f"Bearer {key}"})
        grpc_recs = [r for r in _records(gw.data_dir) if r["protocol"] == "grpc"]
        assert grpc_recs and grpc_recs[-1]["http_status"] == 200 and grpc_recs[-1]["output_tokens"] == 2
        client.close()
    finally:
        gw.stop()


def test_stopping_the_server_fsyncs_every_audit_record(triton: TritonProcess, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A window far longer than the test: no periodic fsync, so only the stop's can cover the records.
    gw = Gateway(tmp_path, triton.http_url, free_ports(3), **{"audit.fsync_interval_s": 600}).start()
    audit_path = gw.data_dir / "audit" / "audit.jsonl"
    synced_sizes: list[int] = []   # the audit file's size at each fsync of it
    real_fsync = os.fsync

    def watched_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(audit_path):
            synced_sizes.append(os.fstat(fd).st_size)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", watched_fsync)
    try:
        _, key = gw.key()
        for i in range(3):
            req = urllib.request.Request(gw.url + "/v2/models/deepseek/generate", method="POST",
                                         data=json.dumps({"text_input": f"sync {i}", "max_tokens": 2}).encode(),
                                         headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
        assert synced_sizes == []
    finally:
        gw.stop()
    assert gw.error is None
    records = [json.loads(line) for line in audit_path.read_text().splitlines() if line.strip()]
    assert sum(r.get("path", "").endswith("/generate") for r in records) == 3
    assert synced_sizes and synced_sizes[-1] == audit_path.stat().st_size


def test_strict_mode_fsyncs_each_record_before_its_response_leaves(triton: TritonProcess, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # kill -9 keeps the page cache, so only watching fsync shows strict mode's promise. The batched
    # window is far longer than the test: any fsync seen here is strict mode's own. Each answer is
    # checked in seekgate's own process at the moment it leaves: an HTTP response when its last
    # byte is written (aiohttp's write_eof), a gRPC call when its handler returns (grpc then sends
    # the response and the OK status).
    gw = _gateway(tmp_path, triton, triton.http_url, "strict", **{"audit.fsync_interval_s": 600})
    audit_path = gw.data_dir / "audit" / "audit.jsonl"
    synced = [0]   # the audit file's size at its last fsync
    real_fsync = os.fsync

    def watched_fsync(fd: int) -> None:
        real_fsync(fd)
        if os.readlink(f"/proc/self/fd/{fd}") == str(audit_path):
            synced[0] = max(synced[0], os.fstat(fd).st_size)
    monkeypatch.setattr(os, "fsync", watched_fsync)

    def synced_records() -> list[bytes]:
        return audit_path.read_bytes()[:synced[0]].splitlines() if audit_path.exists() else []

    http_left: dict[str, bool] = {}   # request id -> its record was fsynced when the response left
    real_write_eof = web.StreamResponse.write_eof

    async def watched_write_eof(self: web.StreamResponse, data: bytes = b"") -> None:
        rid = self.headers.get("X-Request-Id")
        if rid is not None and rid not in http_left:   # aiohttp calls it again, a no-op, after the handler
            http_left[rid] = any(f'"request_id":"{rid}"'.encode() in line for line in synced_records())
        await real_write_eof(self, data)
    monkeypatch.setattr(web.StreamResponse, "write_eof", watched_write_eof)

    grpc_left: list[bool] = []   # per gRPC call: were as many gRPC records fsynced as calls answered?

    def watched(handler: Any) -> Any:
        async def run(*args: Any, **kwargs: Any) -> Any:
            result = await handler(*args, **kwargs)
            grpc_left.append(sum(b'"protocol":"grpc"' in line for line in synced_records()) >= len(grpc_left) + 1)
            return result
        return run
    monkeypatch.setattr(GrpcFrontEnd, "_unary", watched(GrpcFrontEnd._unary))
    monkeypatch.setattr(GrpcFrontEnd, "_stream", watched(GrpcFrontEnd._stream))

    _, key = gw.key()
    gw.start()
    answered: list[str] = []
    try:
        base = gw.url + "/v2/models/deepseek"
        for i in range(3):   # plain responses: read whole from Triton, then the record, then sent
            status, headers, _ = _post(base + "/generate", key, {"text_input": f"strict {i}", "max_tokens": 2})
            assert status == 200
            answered.append(headers["X-Request-Id"])
        status, headers, body = _post(gw.url + "/v2/models/deepseek_stream/generate_stream", key,
                                      {"text_input": "stream", "max_tokens": 3})
        assert status == 200 and body.count(b"data:") == 3   # events flow; the terminating chunk waits
        answered.append(headers["X-Request-Id"])
        for bad in ("sgk_not_a_key", gw.key(expires_in_s=0.001)[1]):   # refusals are durable first too
            status, headers, _ = _post(base + "/generate", bad, {"text_input": "no", "max_tokens": 1})
            assert status == 401
            answered.append(headers["X-Request-Id"])
        with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(infer_request("deepseek", "strict grpc", 2), metadata=md(key))
            assert len(list(stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL, "strict stream", 2)]),
                                                  metadata=md(key)))) == 2
    finally:
        gw.stop()
    assert gw.error is None
    assert {rid: http_left.get(rid) for rid in answered} == {rid: True for rid in answered}
    assert grpc_left == [True, True]
