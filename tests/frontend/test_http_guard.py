"""Hostile HTTP against a real seekgate and Triton: smuggling shapes, slow clients, compressed bombs, 5xx bodies.

Each case: the right status, Triton receives nothing (the relay saw none of it), and the
proxy keeps serving others.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import tritonclient.grpc as grpcclient
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from proxy.errors import BadRequest, PayloadTooLarge
from proxy.frontend import http_guard
from proxy.frontend.grpc import HealthCheckRequest
from proxy.frontend.http_guard import check_aiohttp_internals, decoded_size_within
from proxy.local.triton import TritonProcess
from tests.conftest import free_ports
from tests.frontend.test_grpc import STREAM_MODEL, assert_nothing_forwarded, infer_inputs, infer_request, md, quiet
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, gateway_via, wait_for
from tests.relay import TcpRelay

BODY_CAP = 1 << 20
READ_TIMEOUT = 1.0
GENERATE = "/v2/models/deepseek/generate"
INFER = "/v2/models/deepseek/infer"


@pytest.fixture(scope="module")
def gw(relay: TcpRelay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_via(tmp_path_factory.mktemp("gw"), relay,
                     **{"server.max_body_bytes": BODY_CAP, "server.read_timeout_s": READ_TIMEOUT}) as g:
        yield g


@pytest.fixture(scope="module")
def key(gw: Gateway) -> str:
    return gw.key(owner="mallory")[1]


def port(gw: Gateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def exchange(gw: Gateway, raw: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Sends `raw`, reads until the server closes; (everything read, whether it closed in time)."""
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except TimeoutError:
            return data, False
        return data, True


def still_serving(gw: Gateway, key: str) -> None:
    status, _, raw = call(gw.url + GENERATE, "POST", {"text_input": "still here", "max_tokens": 2}, key)
    assert status == 200, raw


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


# ------------------------------------------------------------------ request smuggling shapes

MARK = b"smuggled-xyz"
SMUGGLED = b"0\r\n\r\nGET /v2/models/" + MARK + b" HTTP/1.1\r\nHost: x\r\n\r\n"
SHAPES = {
    # refused by aiohttp's parser (C and pure-Python alike, see proxy/http_guard.py)
    "cl_and_te": b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "duplicate_cl": b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % ((len(SMUGGLED),) * 2) + SMUGGLED,
    "conflicting_cl": b"Content-Length: 5\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "cl_list": b"Content-Length: 5, %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "te_chunked_identity": b"Transfer-Encoding: chunked, identity\r\n\r\n" + SMUGGLED,
    "te_xchunked": b"Transfer-Encoding: xchunked\r\n\r\n" + SMUGGLED,
    "te_name_leading_space": b" Transfer-Encoding: chunked\r\n\r\n" + SMUGGLED,
    "te_space_before_colon": b"Transfer-Encoding : chunked\r\n\r\n" + SMUGGLED,
    "duplicate_te": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + SMUGGLED,
    "bare_lf": b"Content-Length: %d\n\n" % len(SMUGGLED) + SMUGGLED,
    "obs_fold": b"X-Note: a\r\n folded\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "obs_fold_te": b"Transfer-Encoding:\r\n chunked\r\n\r\n" + SMUGGLED,
    # let through by aiohttp, refused by http_guard.check_framing
    "te_gzip_chunked": b"Transfer-Encoding: gzip, chunked\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_smuggling_shapes_are_400_and_closed(gw: Gateway, relay: TcpRelay, key: str, shape: str) -> None:
    relay.clear()
    head = b"POST " + GENERATE.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
    response, closed = exchange(gw, head + SHAPES[shape])
    assert response.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", response
    assert json.loads(body_of(response)) == {"error": "bad request"}
    assert closed and response.count(b"HTTP/1.") == 1   # no second (smuggled) response
    assert b"generate" not in relay.seen() and MARK not in relay.seen()
    still_serving(gw, key)


@pytest.mark.parametrize("name,headers", [
    ("LineTooLong", b"X-Long: " + b"a" * 70_000 + b"\r\n"),
    ("BadHttpMessage", b"".join(b"X-H%d: v\r\n" % i for i in range(300))),
    ("BadHttpMessage", b"Content-Length: 5\r\nContent-Length: 6\r\n"),
])
def test_requests_the_parser_refuses_are_audited_with_what_is_known(gw: Gateway, relay: TcpRelay, key: str,
                                                                   name: str, headers: bytes) -> None:
    """Refused before any handler runs (no key read): one record with the peer and what the parser said."""
    relay.clear()
    marker = uuid.uuid4().hex.encode()
    response, closed = exchange(gw, b"POST /v2/models/" + marker + b"/generate HTTP/1.1\r\nHost: x\r\n"
                                + headers + b"\r\n")
    status = int(response.split(b"\r\n", 1)[0].split(b" ")[1])
    assert 400 <= status < 500 and closed, response[:200]
    assert marker not in relay.seen()
    head = response.split(b"\r\n\r\n", 1)[0].decode().lower()
    request_id = head.split("\r\nx-request-id: ", 1)[1].split("\r\n", 1)[0]

    def audited() -> list[dict]:  # type: ignore[type-arg]
        return [r for r in audit_records(gw) if r["request_id"] == request_id]
    assert wait_for(lambda: len(audited()) == 1, 5), audited()
    rec = audited()[0]
    assert rec["reason"] == f"http_parser: {name}"
    assert rec["status"] == "denied" and rec["http_status"] == status and rec["client_ip"] == "127.0.0.1"
    assert rec["key_id"] is None and name in rec["reason"] and key not in json.dumps(rec)


def test_transfer_encoding_on_http_1_0_is_400_and_closed(gw: Gateway, relay: TcpRelay, key: str) -> None:
    relay.clear()
    raw = (b"POST " + GENERATE.encode() + b" HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
           + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\nhello\r\n0\r\n\r\n")
    response, closed = exchange(gw, raw)
    assert b" 400 " in response.split(b"\r\n", 1)[0] and closed, response
    assert b"generate" not in relay.seen()
    # Let through by aiohttp's parser: refused by http_guard.check_framing, so audited.
    assert wait_for(lambda: any(r["reason"] == "framing: transfer_encoding_on_http_1_0"
                                for r in audit_records(gw)), 5)


def test_uppercase_and_padded_chunked_is_legal_and_reframed(gw: Gateway, relay: TcpRelay, key: str) -> None:
    """`chunked` in any case with OWS is plain HTTP/1.1: served, and Triton gets a Content-Length."""
    relay.clear()
    payload = json.dumps({"text_input": "reframe-me", "max_tokens": 2}).encode()
    raw = (b"POST " + GENERATE.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
           + key.encode() + b"\r\nTransfer-Encoding:  CHUNKED\r\n\r\n"
           + b"%x\r\n" % 7 + payload[:7] + b"\r\n" + b"%x\r\n" % (len(payload) - 7) + payload[7:] + b"\r\n0\r\n\r\n")
    response, _ = exchange(gw, raw)
    assert b" 200 " in response.split(b"\r\n", 1)[0], response
    seen = relay.seen()
    request = seen[seen.index(b"POST " + GENERATE.encode()):]
    head = request.split(b"\r\n\r\n", 1)[0].lower()
    assert b"content-length: %d" % len(payload) in head and b"transfer-encoding" not in head
    assert payload in request


# ------------------------------------------------------------------ slow clients

def test_trickled_headers_are_cut_and_others_served(gw: Gateway, relay: TcpRelay, key: str) -> None:
    relay.clear()
    head = (b"POST " + GENERATE.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nX-Slow: " + b"s" * 200)
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=10) as s:
        started = time.monotonic()
        got = b""
        try:
            for byte in head:
                s.sendall(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - started > 0.3 and not got:
                    still_serving(gw, key)   # others are served while the trickle goes on
                    got = b"-"
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(5)
        response = b""
        try:
            while chunk := s.recv(4096):
                response += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        elapsed = time.monotonic() - started
    assert response.startswith(b"HTTP/1.1 408"), response
    assert b"\r\nServer: seekgate\r\n" in response.split(b"\r\n\r\n", 1)[0]   # as every other answer
    assert json.loads(body_of(response)) == {"error": "request timed out"}
    assert READ_TIMEOUT * 0.9 < elapsed < READ_TIMEOUT + 4
    assert b"X-Slow" not in relay.seen()
    still_serving(gw, key)
    # The cut is audited: no key (the headers never arrived whole), the peer address, 408.
    assert wait_for(lambda: any(r["reason"].startswith("header_timeout:") for r in audit_records(gw)), 5)
    cut = [r for r in audit_records(gw) if r["reason"].startswith("header_timeout:")
           and not r["reason"].startswith("header_timeout: 0 bytes")]
    assert len(cut) == 1, cut
    assert cut[0]["status"] == "error" and cut[0]["http_status"] == 408
    assert cut[0]["client_ip"] == "127.0.0.1" and cut[0]["key_id"] in ("", None)
    assert b"\r\nX-Request-Id: " + cut[0]["request_id"].encode() + b"\r\n" in response
    sent = int(cut[0]["reason"].split()[1])
    assert 0 < sent < len(head) and key not in json.dumps(cut[0])


def test_silent_connection_is_closed_after_the_read_timeout(gw: Gateway) -> None:
    started = time.monotonic()
    response, closed = exchange(gw, b"", timeout=READ_TIMEOUT + 5)
    assert closed and response.startswith(b"HTTP/1.1 408") and time.monotonic() - started < READ_TIMEOUT + 3
    assert wait_for(lambda: any(r["reason"] == f"header_timeout: 0 bytes in {READ_TIMEOUT:g}s"
                                and r["http_status"] == 408 for r in audit_records(gw)), 5)


# Requests aiohttp's parser refuses before any handler (or on_response_prepare hook) runs.
PARSER_REFUSALS = {
    "garbage_request_line": b"GARBAGE\r\n\r\n",
    "too_many_headers": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
                        + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
    "header_of_70_kb": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
}


def server_header(response: bytes) -> str:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return next((line.split(":", 1)[1].strip() for line in head if line.lower().startswith("server:")), "")


@pytest.mark.parametrize("shape", PARSER_REFUSALS)
def test_parser_refusals_do_not_name_aiohttp(gw: Gateway, shape: str) -> None:
    response, closed = exchange(gw, PARSER_REFUSALS[shape])
    assert closed and response.startswith(b"HTTP/1.") and response[9:10] == b"4", response[:200]
    assert server_header(response) == "seekgate", response[:300]


def test_metrics_answers_do_not_name_aiohttp(gw: Gateway) -> None:
    for path, status in (("/metrics", 200), ("/nope", 404)):
        conn = http.client.HTTPConnection("127.0.0.1", gw.settings.server.metrics_port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert (resp.status, resp.getheader("Server")) == (status, "seekgate")
        finally:
            conn.close()


def test_missing_aiohttp_internals_stop_the_start_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    check_aiohttp_internals()   # the installed aiohttp has them
    monkeypatch.setitem(http_guard.AIOHTTP_INTERNALS, RequestHandler, ("_request_count", "_renamed_by_aiohttp"))
    with pytest.raises(RuntimeError, match=r"RequestHandler\._renamed_by_aiohttp\): install aiohttp>=3\.14"):
        http_guard.GuardedRunner(web.Application(), header_timeout_s=1.0)
    with pytest.raises(RuntimeError) as info:
        check_aiohttp_internals({RequestHandler: ("_request_count", "_gone_in_a_future_aiohttp")})
    message = str(info.value)
    assert "\n" not in message and "RequestHandler._gone_in_a_future_aiohttp" in message
    assert "_request_count" not in message and http_guard.SUPPORTED_AIOHTTP in message


def test_trickled_body_is_cut_with_408(gw: Gateway, relay: TcpRelay, key: str) -> None:
    relay.clear()
    payload = json.dumps({"text_input": "trickle-" + "t" * 60, "max_tokens": 2}).encode()
    head = (b"POST " + GENERATE.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(payload))
    with socket.create_connection(("127.0.0.1", port(gw)), timeout=10) as s:
        s.sendall(head)
        started = time.monotonic()
        response = b""
        s.setblocking(False)
        for byte in payload:
            try:
                s.sendall(bytes([byte]))
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.05)
            try:
                response += s.recv(4096)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
            if response:
                break
        elapsed = time.monotonic() - started
    assert b" 408 " in response.split(b"\r\n", 1)[0], response
    assert json.loads(body_of(response)) == {"error": "request timed out"}
    assert elapsed < READ_TIMEOUT + 2
    assert b"trickle-" not in relay.seen()
    assert wait_for(lambda: any(r["reason"].startswith("body_read_timeout") for r in audit_records(gw)), 5)
    still_serving(gw, key)


# ------------------------------------------------------------------ compressed bodies

def test_gzip_bomb_is_413_and_never_forwarded(gw: Gateway, relay: TcpRelay, key: str) -> None:
    relay.clear()
    bomb = gzip.compress(b'{"inputs": [{"name": "text_input", "data": ["' + b"0" * (64 * BODY_CAP) + b'"]}]}')
    assert len(bomb) < BODY_CAP   # under the cap on the wire, 64x over it decoded
    status, _, raw = call(gw.url + INFER, "POST", bomb, key,
                          {"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert status == 413 and json.loads(raw) == {"error": "request body too large"}
    assert b"/infer" not in relay.seen()
    still_serving(gw, key)


@pytest.mark.parametrize("route,encoding,body,status", [
    (INFER, "deflate", zlib.compress(b"0" * (8 * BODY_CAP)), 413),
    (INFER, "gzip", b"\x1f\x8b not gzip at all", 400),
    (INFER, "br", b"whatever", 415),
    # Triton reads generate bodies as they come: a compressed one is refused there, and so here.
    (GENERATE, "gzip", gzip.compress(b'{"text_input": "hi"}'), 415),
    (GENERATE, "deflate", zlib.compress(b'{"text_input": "hi"}'), 415),
])
def test_other_compressed_bodies_refused(gw: Gateway, relay: TcpRelay, key: str, route: str, encoding: str,
                                         body: bytes, status: int) -> None:
    relay.clear()
    assert call(gw.url + route, "POST", body, key, {"Content-Encoding": encoding})[0] == status
    assert route.encode() not in relay.seen()


def test_gzip_within_the_cap_is_forwarded_compressed_with_a_content_length(
        gw: Gateway, relay: TcpRelay, key: str, triton: TritonProcess) -> None:
    body = gzip.compress(json.dumps({"inputs": [
        {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["zipped-ok"]},
        {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [2]}]}).encode())
    relay.clear()
    gz = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    status, _, raw = call(gw.url + "/v2/models/deepseek/infer", "POST", iter([body[:10], body[10:]]), key,
                          {**gz, "Transfer-Encoding": "chunked"})
    assert status == 200, raw
    seen = relay.seen()
    head, rest = seen[seen.index(b"POST /v2/models/deepseek/infer"):].split(b"\r\n\r\n", 1)
    assert b"content-length: %d" % len(body) in head.lower() and b"transfer-encoding" not in head.lower()
    assert rest.startswith(body)


def test_decoded_size_within_unit() -> None:
    decoded_size_within(gzip.compress(b"a" * 100), "gzip", 100)
    decoded_size_within(b"plain", None, 10)
    with pytest.raises(PayloadTooLarge):
        decoded_size_within(gzip.compress(b"a" * 101), "gzip", 100)
    with pytest.raises(PayloadTooLarge):   # concatenated members are not a way round the cap
        decoded_size_within(zlib.compress(b"b" * 10_000), "deflate", 9_999)
    with pytest.raises(BadRequest):
        decoded_size_within(b"junk", "deflate", 100)


# ------------------------------------------------------------------ upstream errors

TRACE = b'Traceback (most recent call last):\n  File "/opt/tritonserver/backends/python/model.py", line 42'


class FakeTriton(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._send(200, b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        what = json.loads(body)["text_input"]
        if what == "500":
            self._send(500, json.dumps({"error": TRACE.decode()}).encode())
        elif what == "400":
            self._send(400, b'{"error":"unexpected inference input \'bogus\' for model \'deepseek\'"}')
        elif what == "big-chunked":
            self._send_chunked([b'{"text_output":"', *[b"x" * 1000] * 100, b'"}'])
        elif what == "hop":
            self._send(200, b'{"text_output":"hop"}', {
                "Connection": "X-Hop-Private", "X-Hop-Private": "1", "Keep-Alive": "timeout=99",
                "Proxy-Authenticate": "Basic", "Proxy-Connection": "keep-alive", "Trailer": "X-Sum",
                "Upgrade": "h2c", "X-Kept": "yes"})
        else:
            self._send(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_chunked(self, pieces: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in pieces:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTriton)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    g = Gateway(tmp_path_factory.mktemp("fake"), f"http://127.0.0.1:{server.server_address[1]}",
                free_ports(3)).start()
    yield g
    g.stop()
    server.shutdown()


def test_upstream_5xx_passes_through_byte_for_byte_and_is_kept_in_the_audit(fake_gw: Gateway) -> None:
    """Fidelity by default: a client reads Triton's own message and Content-Type (upstream.redact_errors off)."""
    _, key = fake_gw.key(owner="oscar")
    status, headers, raw = call(fake_gw.url + GENERATE, "POST", {"text_input": "500"}, key)
    assert status == 500 and raw == json.dumps({"error": TRACE.decode()}).encode()
    assert headers["Content-Type"] == "application/json" and headers.get("X-Request-Id")
    assert "aiohttp" not in headers.get("Server", "") and "Python" not in headers.get("Server", "")
    assert wait_for(lambda: any("model.py" in r["reason"] and r["request_id"] == headers["X-Request-Id"]
                                and r["status"] == "error" for r in audit_records(fake_gw)), 5), \
        audit_records(fake_gw)[-1:]


def test_upstream_5xx_body_is_replaced_with_redact_errors_and_kept_in_the_audit(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTriton)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gw = Gateway(tmp_path_factory.mktemp("redact"), f"http://127.0.0.1:{server.server_address[1]}",
                 free_ports(3), **{"upstream.redact_errors": True}).start()
    try:
        _, key = gw.key(owner="oscar")
        status, headers, raw = call(gw.url + GENERATE, "POST", {"text_input": "500"}, key)
        assert status == 500 and json.loads(raw) == {"error": "inference server error"}
        assert b"Traceback" not in raw and b"/opt/" not in raw and headers.get("X-Request-Id")
        assert wait_for(lambda: any("model.py" in r["reason"] and r["request_id"] == headers["X-Request-Id"]
                                    for r in audit_records(gw)), 5), audit_records(gw)[-1:]
        # 4xx bodies pass either way: clients need them.
        status, _, raw = call(gw.url + GENERATE, "POST", {"text_input": "400"}, key)
        assert status == 400 and b"unexpected inference input 'bogus'" in raw
    finally:
        gw.stop()
        server.shutdown()


def test_upstream_4xx_message_passes_through(fake_gw: Gateway) -> None:
    _, key = fake_gw.key(owner="olga")
    status, _, raw = call(fake_gw.url + GENERATE, "POST", {"text_input": "400"}, key)
    assert status == 400 and b"unexpected inference input 'bogus'" in raw


def test_a_chunked_answer_over_the_read_ahead_is_streamed_on_whole(fake_gw: Gateway) -> None:
    """Past forward.WHOLE_LIMIT a chunked plain answer is relayed as it comes, from what was read ahead."""
    _, key = fake_gw.key(owner="bigby")
    status, headers, raw = call(fake_gw.url + GENERATE, "POST", {"text_input": "big-chunked"}, key)
    assert status == 200 and headers.get("Transfer-Encoding") == "chunked"
    assert json.loads(raw) == {"text_output": "x" * 100_000}


def test_upstream_redirect_is_not_followed(fake_gw: Gateway) -> None:
    _, key = fake_gw.key(owner="otto")
    status, headers, raw = call(fake_gw.url + GENERATE, "POST", {"text_input": "302"}, key)
    assert status == 502 and "Location" not in headers and b"169.254" not in raw
    # Like every answer: the request id the audit record carries, and the timing (README).
    assert headers["Server-Timing"].startswith("seekgate;dur=") and "upstream;dur=" in headers["Server-Timing"]
    assert wait_for(lambda: any(r["request_id"] == headers["X-Request-Id"] and r["reason"] == "upstream_redirect"
                                for r in audit_records(fake_gw)), 5)


HOP_BY_HOP_SENT = {"Connection": "keep-alive, X-Hop-Private", "X-Hop-Private": "1", "Keep-Alive": "timeout=99",
                   "TE": "trailers", "Upgrade": "h2c", "Proxy-Authorization": "Basic c2VjcmV0",
                   "Proxy-Connection": "keep-alive",
                   # Identities only seekgate may assert: a client's own never reaches Triton either.
                   "X-Real-IP": "6.6.6.6", "X-Forwarded-For": "6.6.6.6", "True-Client-IP": "6.6.6.6"}


def test_hop_by_hop_request_headers_never_reach_triton(gw: Gateway, relay: TcpRelay, key: str) -> None:
    marker = f"hop-{uuid.uuid4().hex}"
    # http.client, not urllib: urllib replaces the client's Connection header with its own.
    conn = http.client.HTTPConnection("127.0.0.1", gw.settings.server.http_port, timeout=30)
    conn.request("POST", GENERATE, json.dumps({"text_input": marker, "max_tokens": 2}),
                 {**HOP_BY_HOP_SENT, "X-Kept": "yes", "Authorization": f"Bearer {key}"})
    answer = conn.getresponse()
    answer.read()
    conn.close()
    assert answer.status == 200
    upstream = relay.connection_carrying(marker.encode())
    assert upstream is not None
    request = bytes(upstream.seen)[:bytes(upstream.seen).index(marker.encode())]
    head = request[request.rindex(b"POST " + GENERATE.encode()):].split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nx-kept: yes" in head
    for name in HOP_BY_HOP_SENT:
        assert b"\r\n" + name.lower().encode() + b":" not in head, name


def test_hop_by_hop_response_headers_never_reach_the_client(fake_gw: Gateway) -> None:
    _, key = fake_gw.key(owner="hopper")
    status, headers, raw = call(fake_gw.url + GENERATE, "POST", {"text_input": "hop"}, key)
    assert status == 200 and raw == b'{"text_output":"hop"}' and headers["X-Kept"] == "yes"
    received = {name.lower() for name in headers}
    assert not received & {"x-hop-private", "keep-alive", "proxy-authenticate", "proxy-connection", "trailer",
                           "upgrade"}
    assert headers.get("Connection", "keep-alive").lower() in ("keep-alive", "close")


def test_real_triton_400_message_passes_through(gw: Gateway, triton: TritonProcess, key: str) -> None:
    body = {"inputs": [{"name": "bogus", "shape": [1], "datatype": "INT32", "data": [1]}]}
    status, _, proxied = call(gw.url + "/v2/models/deepseek/infer", "POST", body, key)
    _, _, direct = call(triton.http_url + "/v2/models/deepseek/infer", "POST", body)
    assert status == 400 and proxied == direct and json.loads(proxied)["error"]


# ------------------------------------------------------------------ gRPC messages over the cap

GRPC_CAP = 64 * 1024


@pytest.fixture(scope="module")
def grpc_gw(triton: TritonProcess, grpc_relay: TcpRelay,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-grpc-cap"), triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{grpc_relay.port}",
                   "server.grpc_max_message_bytes": GRPC_CAP}).start()
    yield g
    g.stop()


def over_cap_records(gw: Gateway) -> list[dict[str, object]]:
    return [r for r in audit_records(gw) if str(r["reason"]).startswith("body_too_large")]


# Just over the cap, grpc core lets the message through and seekgate refuses it itself; far over (past
# core's slack, the cap again here) core refuses it unread and seekgate audits that refusal.
JUST_OVER, FAR_OVER = GRPC_CAP + 1024, 4 * GRPC_CAP


@pytest.mark.parametrize("size", [JUST_OVER, FAR_OVER], ids=["seekgate", "grpc-core"])
def test_grpc_message_over_the_cap_is_refused_and_audited(grpc_gw: Gateway, grpc_relay: TcpRelay, size: int) -> None:
    _, key = grpc_gw.key(owner=f"mallory-grpc-{size}")
    before = len(over_cap_records(grpc_gw))
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_gw.settings.server.grpc_port}")
    headers = {"authorization": f"Bearer {key}"}
    quiet(grpc_relay)
    with pytest.raises(InferenceServerException) as info:
        client.infer("deepseek", infer_inputs(grpcclient, "x" * size, 2), headers=headers)
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert_nothing_forwarded(grpc_relay)
    assert wait_for(lambda: len(over_cap_records(grpc_gw)) == before + 1, 5), json.dumps(audit_records(grpc_gw)[-3:])
    rec = over_cap_records(grpc_gw)[-1]
    assert rec["status"] == "denied" and rec["http_status"] == 413 and rec["client_ip"] == "127.0.0.1"
    assert rec["reason"] == "body_too_large: over server.grpc_max_message_bytes"
    # Under the cap: served as before, and not audited as too large.
    result = client.infer("deepseek", infer_inputs(grpcclient, "small", 2), headers=headers)
    assert result.as_numpy("output_tokens") is not None and len(over_cap_records(grpc_gw)) == before + 1
    client.close()


@pytest.mark.parametrize("size", [JUST_OVER, FAR_OVER], ids=["seekgate", "grpc-core"])
def test_grpc_stream_whose_first_message_is_over_the_cap_is_audited(grpc_gw: Gateway, size: int) -> None:
    _, key = grpc_gw.key(owner=f"mallory-stream-{size}")
    before = len(over_cap_records(grpc_gw))
    with grpc.insecure_channel(f"127.0.0.1:{grpc_gw.settings.server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL, "y" * size)]), metadata=md(key))
        with pytest.raises(grpc.RpcError) as info:
            list(responses)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Failed once in four full runs (not reproduced since): the records say what was audited instead.
    assert wait_for(lambda: len(over_cap_records(grpc_gw)) == before + 1, 5), json.dumps(audit_records(grpc_gw)[-3:])
    rec = over_cap_records(grpc_gw)[-1]
    assert rec["http_status"] == 413
    # Only seekgate's own refusal names the request (core's carries no metadata of ours).
    trailers = dict(info.value.trailing_metadata() or ())
    assert (trailers.get("x-request-id") == rec["request_id"]) == (size == JUST_OVER), trailers


def test_grpc_health_check_over_the_cap_is_refused(grpc_gw: Gateway) -> None:
    """The health service answers on the same server: a check just over the cap is refused there too."""
    before = len(over_cap_records(grpc_gw))
    with grpc.insecure_channel(f"127.0.0.1:{grpc_gw.settings.server.grpc_port}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.RpcError) as info:
            check(HealthCheckRequest(service="s" * JUST_OVER).SerializeToString())
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert wait_for(lambda: len(over_cap_records(grpc_gw)) == before + 1, 5)


def test_grpc_stream_message_over_the_cap_after_a_good_one_ends_the_stream(grpc_gw: Gateway) -> None:
    """The first message served; a later one over the cap ends the stream with RESOURCE_EXHAUSTED, audited 413."""
    _, key = grpc_gw.key(owner="mallory-stream-later")
    before = len(over_cap_records(grpc_gw))
    sent_second = threading.Event()

    def messages() -> Iterator[object]:
        yield infer_request(STREAM_MODEL, "fine")
        time.sleep(0.5)   # the first one's tokens come back first
        sent_second.set()
        yield infer_request(STREAM_MODEL, "z" * JUST_OVER)

    with grpc.insecure_channel(f"127.0.0.1:{grpc_gw.settings.server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for response in stub.ModelStreamInfer(messages(), metadata=md(key), timeout=30):
                got.append(response)
    assert sent_second.is_set() and got and not any(r.error_message for r in got)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert wait_for(lambda: len(over_cap_records(grpc_gw)) == before + 1, 5)
    rec = over_cap_records(grpc_gw)[-1]
    assert rec["http_status"] == 413
    assert dict(info.value.trailing_metadata() or ())["x-request-id"] == rec["request_id"]


def test_grpc_unary_call_without_a_message_is_invalid_argument(grpc_gw: Gateway) -> None:
    """A unary method given no message at all (only a hand-made client can) is refused, not taken as over-cap."""
    _, key = grpc_gw.key(owner="mallory-empty")
    with grpc.insecure_channel(f"127.0.0.1:{grpc_gw.settings.server.grpc_port}") as channel:
        call = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(iter([]), metadata=md(key))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wait_for(lambda: any(r["reason"] == "no_request_message" for r in audit_records(grpc_gw)), 5)
