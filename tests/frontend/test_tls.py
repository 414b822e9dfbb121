"""TLS on every listener, against the real Triton: versions (openssl, curl), tritonclient over TLS, mTLS, rotation."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import uvloop
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    load_pem_private_key,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli.devcert import CLIENT_SPIFFE, make_dev_certs
from proxy.frontend.grpc_tls import GrpcTlsTerminator
from proxy.frontend.tls import ServerTls
from proxy.frontend.tls_site import listener_site
from proxy.local.triton import TritonProcess, free_ports
from proxy.settings import ServerSettings
from tests.gateway import Gateway, audit_records, wait_for

GENERATE = "/v2/models/deepseek/generate"
STREAM = "/v2/models/deepseek_stream/generate_stream"


def tls_overrides(certs: dict[str, Path], mtls: bool = False) -> dict[str, object]:
    out: dict[str, object] = {"server.tls_cert_file": str(certs["server_cert"]),
                              "server.tls_key_file": str(certs["server_key"]),
                              "server.tls_reload_interval_s": 0.2}
    if mtls:
        out["server.tls_client_ca_file"] = str(certs["ca"])
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_gw(triton: TritonProcess, certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-tls"), triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}", **tls_overrides(certs)}).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def mtls_gw(triton: TritonProcess, certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-mtls"), triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}",
                   **tls_overrides(certs, mtls=True)}).start()
    yield g
    g.stop()


def client_context(certs: dict[str, Path], client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    if client_cert:
        ctx.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
    return ctx


def https_call(port: int, ctx: ssl.SSLContext, path: str, key: str | None = None,
               body: dict[str, object] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        conn.request("POST" if body is not None else "GET", path,
                     json.dumps(body).encode() if body is not None else None, headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def s_client(port: int, version: str, ca: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", f"-{version}",
                           "-CAfile", str(ca), "-verify_return_error", "-brief", *extra],
                          input="", capture_output=True, text=True, errors="replace", timeout=30)


def served_fingerprint(port: int) -> str:
    """SHA-256 of the certificate a new connection to `port` is presented."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE   # we read it, whoever signed it
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.connect()
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()
    finally:
        conn.close()


def tls_metric(gw: Gateway, ca: Path, name: str) -> float:
    """A metric scraped over the metrics listener's TLS."""
    return tls_metric_at(gw.settings.server.metrics_port, ca, name)


def tls_metric_at(metrics_port: int, ca: Path, name: str) -> float:
    _, _, body = https_call(metrics_port, ssl.create_default_context(cafile=str(ca)), "/metrics")
    return sum(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples if s.name == name)


def fingerprint(pem: Path) -> str:
    return hashlib.sha256(x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER)).hexdigest()


# ------------------------------------------------------------------ versions


@pytest.mark.parametrize("listener", ["http", "grpc", "metrics"])
def test_tls13_is_served_and_a_tls12_only_client_is_refused(tls_gw: Gateway, certs: dict[str, Path],
                                                            listener: str) -> None:
    s = tls_gw.settings.server
    port = {"http": s.http_port, "grpc": s.grpc_port, "metrics": s.metrics_port}[listener]
    alpn = ("-alpn", "h2") if listener == "grpc" else ()
    ok = s_client(port, "tls1_3", certs["ca"], *alpn)
    assert ok.returncode == 0 and "TLSv1.3" in ok.stderr + ok.stdout, ok.stderr
    refused = s_client(port, "tls1_2", certs["ca"], *alpn)
    # gRPC included: its TLS is terminated by seekgate (grpc_tls.py), since grpcio cannot refuse 1.2.
    assert refused.returncode != 0, refused.stderr + refused.stdout
    assert "CONNECTION ESTABLISHED" not in refused.stderr + refused.stdout, refused.stderr + refused.stdout


def test_curl_with_explicit_versions(tls_gw: Gateway, certs: dict[str, Path]) -> None:
    url = f"https://127.0.0.1:{tls_gw.settings.server.http_port}/v2/health/ready"
    ok = subprocess.run(["curl", "-sS", "--tlsv1.3", "--cacert", str(certs["ca"]), "-o", "/dev/null",
                         "-w", "%{http_code} %{ssl_verify_result}", url], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stdout == "200 0", ok.stderr
    refused = subprocess.run(["curl", "-sS", "--tlsv1.2", "--tls-max", "1.2", "--cacert", str(certs["ca"]), url],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 35, (refused.returncode, refused.stderr)   # CURLE_SSL_CONNECT_ERROR
    plain = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                            url.replace("https:", "http:")], capture_output=True, text=True, timeout=30)
    assert plain.stdout != "200"   # plaintext on a TLS port is never served


def test_metrics_over_tls(tls_gw: Gateway, certs: dict[str, Path]) -> None:
    status, headers, body = https_call(tls_gw.settings.server.metrics_port, client_context(certs), "/metrics")
    assert status == 200 and b"seekgate_tls_reload_errors" in body


def test_over_tls_parser_refusals_and_metrics_do_not_name_aiohttp(tls_gw: Gateway, certs: dict[str, Path]) -> None:
    s = tls_gw.settings.server
    with socket.create_connection(("127.0.0.1", s.http_port), timeout=10) as raw, \
            client_context(certs).wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GARBAGE\r\n\r\n")
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    assert response[9:12] == b"400" and b"\r\nServer: seekgate\r\n" in response, response[:300]
    for path, status in (("/metrics", 200), ("/nope", 404)):
        got, headers, _ = https_call(s.metrics_port, client_context(certs), path)
        assert (got, headers.get("Server")) == (status, "seekgate")


def tls12_refusal_then_silence(sock: socket.socket, certs: dict[str, Path]) -> bytes:
    """A TLS 1.2 ClientHello on `sock`, the server's alert read, then nothing: what the server sends after it."""
    ctx = client_context(certs)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    sock.sendall(outgoing.read())
    incoming.write(sock.recv(65536))
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
        client.do_handshake()
    try:
        return sock.recv(1)
    except ConnectionResetError:
        return b""   # an abort is a close too


def test_a_connection_that_never_starts_a_handshake_is_closed_after_the_read_timeout(
        triton: TritonProcess, certs: dict[str, Path], tmp_path: Path) -> None:
    """Every TLS listener holds a silent connection read_timeout_s, not asyncio's 60 s handshake default, when it
    never started a handshake; one refused and told why is not held at all."""
    g = Gateway(tmp_path, triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}", **tls_overrides(certs),
                   "server.read_timeout_s": 1.0}).start()
    s = g.settings.server
    try:
        for port in (s.http_port, s.metrics_port, s.grpc_port):
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=15) as silent:
                try:
                    assert silent.recv(1) == b""
                except ConnectionResetError:
                    pass   # an abort is a close too
            assert time.monotonic() - started < 5, (port, time.monotonic() - started)
            # Nor is one that got its alert (it is closed once the alert is out: tls_accept.py).
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=15) as told:
                assert tls12_refusal_then_silence(told, certs) == b""
            assert time.monotonic() - started < 5, (port, time.monotonic() - started)
        assert https_call(s.http_port, client_context(certs), "/v2/health/live")[0] == 200
    finally:
        g.stop()


# ------------------------------------------------------------------ Triton's clients over TLS


def text_inputs(module: object, text: str, max_tokens: int) -> list[object]:
    a = module.InferInput("text_input", [1, 1], "BYTES")   # type: ignore[attr-defined]
    a.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    b = module.InferInput("max_tokens", [1, 1], "INT32")   # type: ignore[attr-defined]
    b.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [a, b]


def test_tritonclient_http_with_ssl(tls_gw: Gateway, triton: TritonProcess, certs: dict[str, Path]) -> None:
    _, key = tls_gw.key(owner="tina")
    ctx = client_context(certs)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{tls_gw.settings.server.http_port}", ssl=True,
                                              ssl_context_factory=lambda **_: ctx)
    try:
        result = client.infer("deepseek", text_inputs(httpclient, "hello", 3),
                              headers={"Authorization": f"Bearer {key}"})
        direct = httpclient.InferenceServerClient(triton.http_url.split("//")[1]).infer(
            "deepseek", text_inputs(httpclient, "hello", 3))
        assert result.as_numpy("text_output").tolist() == direct.as_numpy("text_output").tolist()
    finally:
        client.close()


def test_generate_stream_over_tls_is_byte_for_byte(tls_gw: Gateway, triton: TritonProcess,
                                                   certs: dict[str, Path]) -> None:
    _, key = tls_gw.key(owner="sse")
    body = {"text_input": "stream", "max_tokens": 4}
    status, headers, proxied = https_call(tls_gw.settings.server.http_port, client_context(certs), STREAM, key, body)
    conn = http.client.HTTPConnection("127.0.0.1", triton.launch.http_port, timeout=30)
    conn.request("POST", STREAM, json.dumps(body).encode())
    direct = conn.getresponse().read()
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream") and proxied == direct


def test_tritonclient_grpc_with_ssl_unary_and_stream(tls_gw: Gateway, certs: dict[str, Path]) -> None:
    _, key = tls_gw.key(owner="gina")
    client = grpcclient.InferenceServerClient(f"localhost:{tls_gw.settings.server.grpc_port}", ssl=True,
                                              root_certificates=str(certs["ca"]))
    try:
        result = client.infer("deepseek", text_inputs(grpcclient, "hello", 3),
                              headers={"authorization": f"Bearer {key}"})
        assert result.as_numpy("text_output") is not None
        got: list[object] = []
        done = threading.Event()

        def on(result: object, error: object) -> None:
            got.append(error or result)
            if error is not None or len(got) >= 4:
                done.set()
        client.start_stream(on, headers={"authorization": f"Bearer {key}"})
        client.async_stream_infer("deepseek_stream", text_inputs(grpcclient, "stream me", 4))
        assert done.wait(60), got
        client.stop_stream()
        assert all(isinstance(r, grpcclient.InferResult) for r in got), got
    finally:
        client.close()


# ------------------------------------------------------------------ mTLS


def test_mtls_without_a_client_certificate_is_refused(mtls_gw: Gateway, certs: dict[str, Path]) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_call(mtls_gw.settings.server.http_port, client_context(certs), "/v2/health/ready")


def test_mtls_with_a_certificate_of_another_ca_is_refused(mtls_gw: Gateway, certs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    other = make_dev_certs(tmp_path / "other")
    ctx = client_context(certs)
    ctx.load_cert_chain(str(other["client_cert"]), str(other["client_key"]))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_call(mtls_gw.settings.server.http_port, ctx, "/v2/health/ready")
    client = grpcclient.InferenceServerClient(f"localhost:{mtls_gw.settings.server.grpc_port}", ssl=True,
                                              root_certificates=str(certs["ca"]),
                                              private_key=str(other["client_key"]),
                                              certificate_chain=str(other["client_cert"]))
    with pytest.raises(Exception, match="(?i)unavailable|handshake|ssl|connect"):
        client.is_server_live()
    client.close()


def refusal_seen_by_client(port: int, ctx: ssl.SSLContext, alpn: str | None = None) -> str:
    """The reason of the SSLError a client of `port` gets, handshaking with `ctx` and then asking for something."""
    if alpn:
        ctx.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError) as refused:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                # TLS 1.3: the client's side of the handshake is done before the server has checked its certificate.
                tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
                tls.recv(1)
    return str(refused.value.reason)


def test_a_refused_handshake_reaches_the_client_as_its_alert(tls_gw: Gateway, mtls_gw: Gateway, certs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """asyncio closed the connection of a refused handshake without sending the fatal alert OpenSSL wrote (CPython
    gh-98078, uvloop alike): the client saw a closed connection, not why. tls.AlertFirst lets the alert go first."""
    s, ms = tls_gw.settings.server, mtls_gw.settings.server
    for port, alpn in ((ms.http_port, None), (ms.grpc_port, "h2"), (ms.metrics_port, None)):
        assert refusal_seen_by_client(port, client_context(certs), alpn) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    other = make_dev_certs(tmp_path / "other")
    foreign = client_context(certs)
    foreign.load_cert_chain(str(other["client_cert"]), str(other["client_key"]))
    # Both dev CAs are named "seekgate dev CA": OpenSSL takes the trusted one for the issuer, and its signature
    # check fails (decrypt_error; a CA of another name would be unknown_ca).
    assert refusal_seen_by_client(ms.http_port, foreign) == "TLSV1_ALERT_DECRYPT_ERROR"
    for port, alpn in ((s.http_port, None), (s.grpc_port, "h2"), (s.metrics_port, None)):
        tls12 = client_context(certs)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert refusal_seen_by_client(port, tls12, alpn) == "TLSV1_ALERT_PROTOCOL_VERSION"
    # Still served after all that: each refused connection was closed once its alert was sent.
    assert https_call(ms.http_port, client_context(certs, client_cert=True), "/v2/health/live")[0] == 200


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_the_alert_goes_first_on_the_loop_serve_runs_too(loop_factory: Callable[[], asyncio.AbstractEventLoop],
                                                         certs: dict[str, Path]) -> None:
    """`serve` runs on uvloop, whose TLS code is its own (Cython, the same flaw): the alert reaches the client there too."""
    settings = ServerSettings(tls_cert_file=str(certs["server_cert"]), tls_key_file=str(certs["server_key"]),
                              tls_client_ca_file=str(certs["ca"]))

    async def main() -> str:
        async def never_called(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()
        server = await asyncio.start_server(never_called, "127.0.0.1", 0, ssl=ServerTls(settings).context)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await asyncio.to_thread(refusal_seen_by_client, port, client_context(certs))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(main()) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


def refused_then_silent(port: int, ctx: ssl.SSLContext, alpn: str | None = None) -> tuple[str, str]:
    """A client of `port` that finishes its side of the handshake with `ctx`, then sends nothing and never hangs up:
    (the reason of the alert it reads, how the server ended the connection: "eof" or "reset").

    The socket's 10 s timeout fails the test: a refused connection must not wait for the client (the read timeout,
    which also ends the handshake, is 30 s on these gateways)."""
    if alpn:
        ctx.set_alpn_protocols([alpn])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        while True:
            try:
                client.do_handshake()   # TLS 1.3: done before the server has checked the certificate
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
            except ssl.SSLError as refused:   # refused at the ClientHello (TLS 1.2): the server sent the alert
                return str(refused.reason), server_end(sock)
        sock.sendall(outgoing.read())
        end = server_end(sock, incoming)
    with pytest.raises(ssl.SSLError) as refused:
        client.read(1)
    return str(refused.value.reason), end


def server_end(sock: socket.socket, into: ssl.MemoryBIO | None = None) -> str:
    """Reads `sock` until the server ends the connection (what it sends goes `into`); raises at the socket timeout."""
    try:
        while data := sock.recv(65536):
            if into is not None:
                into.write(data)
    except ConnectionResetError:
        return "reset"
    return "eof"


def test_a_refused_client_that_stays_silent_is_closed_once_told_why(tls_gw: Gateway, mtls_gw: Gateway,
                                                                    certs: dict[str, Path]) -> None:
    """A refused connection stayed open after its alert until the client hung up or the handshake deadline
    passed: a slowloris of refused handshakes held a socket and a task each. It is closed once the alert is sent."""
    s, ms = tls_gw.settings.server, mtls_gw.settings.server
    for port, alpn in ((ms.http_port, None), (ms.grpc_port, "h2"), (ms.metrics_port, None)):
        reason, end = refused_then_silent(port, client_context(certs), alpn)
        assert reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED", port
        assert end in ("eof", "reset"), port
    for port, alpn in ((s.http_port, None), (s.grpc_port, "h2")):
        tls12 = client_context(certs)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        reason, end = refused_then_silent(port, tls12, alpn)
        assert (reason, end in ("eof", "reset")) == ("TLSV1_ALERT_PROTOCOL_VERSION", True), port
    # Closing refused connections leaves the listeners serving.
    assert https_call(ms.http_port, client_context(certs, client_cert=True), "/v2/health/live")[0] == 200


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_refused_silent_client_is_closed_on_the_loop_serve_runs_too(
        loop_factory: Callable[[], asyncio.AbstractEventLoop], certs: dict[str, Path]) -> None:
    """`serve` runs on uvloop, whose TLS protocol is its own (Cython): the HTTP site and the gRPC TLS listener
    close a refused connection there too (the gateways above run on asyncio's loop)."""
    settings = ServerSettings(tls_cert_file=str(certs["server_cert"]), tls_key_file=str(certs["server_key"]),
                              tls_client_ca_file=str(certs["ca"]))

    async def main() -> list[tuple[str, str]]:
        tls = ServerTls(settings)
        runner = web.AppRunner(web.Application())
        await runner.setup()
        site = listener_site(runner, "127.0.0.1", 0, tls.context, handshake_timeout_s=30.0)
        grpc_door = GrpcTlsTerminator(tls.grpc_context, handshake_timeout_s=30.0)
        try:
            await site.start()
            http_port = runner.addresses[0][1]
            grpc_port = await grpc_door.start("127.0.0.1", 0, inner_port=1)   # a refused client never gets there
            return [await asyncio.to_thread(refused_then_silent, port, client_context(certs), alpn)
                    for port, alpn in ((http_port, None), (grpc_port, "h2"))]
        finally:
            grpc_door.close()
            await grpc_door.abort_all()
            await runner.cleanup()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        for reason, end in runner.run(main()):
            assert (reason, end in ("eof", "reset")) == ("TLSV13_ALERT_CERTIFICATE_REQUIRED", True)


def test_a_refusal_with_no_alert_to_send_closes_at_once(tls_gw: Gateway) -> None:
    """Plaintext HTTP on the TLS port: OpenSSL refuses it without an alert, so nothing is waited for (the read
    timeout here is 30 s, the socket's 10 s)."""
    with socket.create_connection(("127.0.0.1", tls_gw.settings.server.http_port), timeout=10) as plain:
        plain.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            assert plain.recv(1) == b""
        except ConnectionResetError:
            pass   # an abort is a close too


def refusals(gw: Gateway, ctx: ssl.SSLContext) -> dict[str, float]:
    """seekgate_tls_handshake_refusals_total by reason, scraped with `ctx`."""
    body = https_call(gw.settings.server.metrics_port, ctx, "/metrics")[2].decode()
    return {m.labels["reason"]: m.value for f in text_string_to_metric_families(body) for m in f.samples
            if m.name == "seekgate_tls_handshake_refusals_total"}


def test_refused_handshakes_are_counted_and_logged_by_reason(tls_gw: Gateway, mtls_gw: Gateway, certs: dict[str, Path],
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="seekgate.tls")
    s, ms = tls_gw.settings.server, mtls_gw.settings.server
    before = refusals(tls_gw, client_context(certs))
    assert s_client(s.http_port, "tls1_2", certs["ca"]).returncode != 0
    assert s_client(s.grpc_port, "tls1_2", certs["ca"], "-alpn", "h2").returncode != 0
    assert wait_for(lambda: refusals(tls_gw, client_context(certs)).get("protocol_version", 0)
                    == before.get("protocol_version", 0) + 2, 5)

    scrape = client_context(certs, client_cert=True)
    before = refusals(mtls_gw, scrape)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_call(ms.http_port, client_context(certs), "/v2/health/ready")
    other = make_dev_certs(tmp_path / "other")
    foreign = client_context(certs)
    foreign.load_cert_chain(str(other["client_cert"]), str(other["client_key"]))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_call(ms.http_port, foreign, "/v2/health/ready")
    after = refusals(mtls_gw, scrape)
    assert after.get("certificate_required", 0) == before.get("certificate_required", 0) + 1, after
    assert sum(after.values()) == sum(before.values()) + 2, (before, after)
    assert any(r.getMessage() == "TLS handshake refused: certificate_required" for r in caplog.records)


def test_mtls_client_identity_reaches_the_audit_record(mtls_gw: Gateway, certs: dict[str, Path]) -> None:
    _, key = mtls_gw.key(owner="carl")
    status, headers, _ = https_call(mtls_gw.settings.server.http_port, client_context(certs, client_cert=True),
                                    GENERATE, key, {"text_input": "hi", "max_tokens": 2})
    assert status == 200
    want = fingerprint(certs["client_cert"])
    assert wait_for(lambda: any(r["request_id"] == headers["X-Request-Id"] for r in audit_records(mtls_gw)), 5)
    record = next(r for r in audit_records(mtls_gw) if r["request_id"] == headers["X-Request-Id"])
    assert record["client_cert"]["fingerprint"] == want
    assert f"URI:{CLIENT_SPIFFE}" in record["client_cert"]["sans"]
    assert "CN=seekgate dev client" in record["client_cert"]["subject"]
    # gRPC: the same certificate, the same fingerprint in the record.
    client = grpcclient.InferenceServerClient(f"localhost:{mtls_gw.settings.server.grpc_port}", ssl=True,
                                              root_certificates=str(certs["ca"]),
                                              private_key=str(certs["client_key"]),
                                              certificate_chain=str(certs["client_cert"]))
    try:
        client.infer("deepseek", text_inputs(grpcclient, "hi", 2), headers={"authorization": f"Bearer {key}"})
    finally:
        client.close()
    assert wait_for(lambda: any(r["protocol"] == "grpc" and r.get("client_cert", {}).get("fingerprint") == want
                                and r["actor"] == "carl" for r in audit_records(mtls_gw)), 5)


def test_grpc_over_mtls_stream_keeps_the_client_identity_and_address(mtls_gw: Gateway,
                                                                       certs: dict[str, Path]) -> None:
    """The TLS listener relays to grpc on loopback: the client's own address and certificate must still be
    what the audit records (not the relay's), for a stream as for a unary call."""
    _, key = mtls_gw.key(owner="stella")
    client = grpcclient.InferenceServerClient(f"localhost:{mtls_gw.settings.server.grpc_port}", ssl=True,
                                              root_certificates=str(certs["ca"]),
                                              private_key=str(certs["client_key"]),
                                              certificate_chain=str(certs["client_cert"]))
    got: list[object] = []
    done = threading.Event()

    def on(result: object, error: object) -> None:
        got.append(error or result)
        if error is not None or len(got) >= 3:
            done.set()
    try:
        client.start_stream(on, headers={"authorization": f"Bearer {key}"})
        client.async_stream_infer("deepseek_stream", text_inputs(grpcclient, "stream me", 3))
        assert done.wait(60), got
        client.stop_stream()
    finally:
        client.close()
    assert all(isinstance(r, grpcclient.InferResult) for r in got), got
    want = fingerprint(certs["client_cert"])

    def stream_record() -> dict[str, object] | None:
        return next((r for r in audit_records(mtls_gw) if r["actor"] == "stella" and r["protocol"] == "grpc"), None)
    assert wait_for(lambda: stream_record() is not None, 10)
    record = stream_record()
    assert record is not None and record["status"] == "allowed"
    assert record["client_ip"] == "127.0.0.1"
    assert record["client_cert"]["fingerprint"] == want   # type: ignore[index]


def test_grpc_call_that_bypasses_the_tls_listener_is_refused(triton: TritonProcess, certs: dict[str, Path],
                                                               tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Fail closed: the inner plaintext port is reachable on loopback, but a call on a connection the TLS
    listener did not make has no known client, so it is refused even with a valid key."""
    caplog.set_level(logging.INFO, logger="seekgate.grpc_tls")
    gw = Gateway(tmp_path, triton.http_url, free_ports(3),
                 **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}", **tls_overrides(certs)}).start()
    try:
        inner = next(int(r.args[3]) for r in caplog.records   # type: ignore[index]
                     if r.name == "seekgate.grpc_tls" and r.args[1] == gw.settings.server.grpc_port)  # type: ignore[index]
        _refused_on_the_inner_port(gw, inner)
    finally:
        gw.stop()


def _refused_on_the_inner_port(tls_gw: Gateway, inner: int) -> None:
    _, key = tls_gw.key(owner="sneaky")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{inner}")
    try:
        with pytest.raises(Exception, match="UNAUTHENTICATED") as info:
            client.infer("deepseek", text_inputs(grpcclient, "hi", 2), headers={"authorization": f"Bearer {key}"})
        assert "invalid or missing credentials" in str(info.value)
    finally:
        client.close()
    assert wait_for(lambda: any(r["reason"] == "connection_not_from_tls_listener" for r in audit_records(tls_gw)), 5)


def test_policy_can_require_the_client_certificate_of_a_service(triton: TritonProcess, certs: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """environment.client_certs: an app key is served only over the certificate of its service."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "mtls.yaml").write_text(f"""
rules:
  - id: billing-only-over-its-cert
    effect: allow
    subject: {{owners: [billing]}}
    resources: ["model:*"]
    actions: [infer]
    environment: {{client_certs: ["URI:{CLIENT_SPIFFE}"]}}
  - id: others-over-another-cert
    effect: allow
    subject: {{owners: [ledger]}}
    resources: ["model:*"]
    actions: [infer]
    environment: {{client_certs: ["URI:spiffe://seekgate.dev/ledger"]}}
""")
    g = Gateway(tmp_path, triton.http_url, free_ports(3), **tls_overrides(certs, mtls=True)).start()
    try:
        ctx = client_context(certs, client_cert=True)
        body = {"text_input": "hi", "max_tokens": 2}
        assert https_call(g.settings.server.http_port, ctx, GENERATE, g.key(owner="billing", tier="app")[1],
                          body)[0] == 200
        assert https_call(g.settings.server.http_port, ctx, GENERATE, g.key(owner="ledger", tier="app")[1],
                          body)[0] == 403
    finally:
        g.stop()


# ------------------------------------------------------------------ rotation


def test_rotation_under_keep_alive_load_and_a_broken_file_keeps_the_old_cert(
        triton: TritonProcess, tmp_path: Path) -> None:
    first, second = make_dev_certs(tmp_path / "first"), make_dev_certs(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server_cert", "server_key"):
        shutil.copy(first[name], live / first[name].name)
    g = Gateway(tmp_path / "gw", triton.http_url, free_ports(3),
                **{"server.tls_cert_file": str(live / "server.pem"), "server.tls_key_file": str(live / "server-key.pem"),
                   "server.tls_reload_interval_s": 0.2}).start()
    port = g.settings.server.http_port
    try:
        _, key = g.key(owner="rot")
        assert served_fingerprint(port) == fingerprint(first["server_cert"])
        stop, failures, served = threading.Event(), [], [0]

        def load() -> None:
            # Keep-alive connections made before the swap, verified by the first CA, used throughout.
            conns = [http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(
                cafile=str(first["ca"])), timeout=30) for _ in range(4)]
            while not stop.is_set():
                for conn in conns:
                    try:
                        conn.request("GET", "/v2/models/deepseek", headers={"Authorization": f"Bearer {key}"})
                        resp = conn.getresponse()
                        resp.read()
                        if resp.status != 200:
                            failures.append(resp.status)
                        served[0] += 1
                    except Exception as exc:   # noqa: BLE001  any failure is what this test counts
                        failures.append(repr(exc))
            for conn in conns:
                conn.close()
        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(0.5)
        # cert-manager's way: new files moved into place.
        for name in ("server_cert", "server_key"):
            tmp = live / (second[name].name + ".new")
            shutil.copy(second[name], tmp)
            tmp.replace(live / second[name].name)
        assert wait_for(lambda: served_fingerprint(port) == fingerprint(second["server_cert"]), 10)
        time.sleep(0.5)
        stop.set()
        worker.join(30)
        assert failures == [] and served[0] > 20, (failures[:5], served[0])
        # A new connection now verifies with the new CA only.
        assert https_call(port, ssl.create_default_context(cafile=str(second["ca"])), "/v2/health/ready")[0] == 200

        # A broken renewal: the key no longer matches the certificate. The old one stays, counted, logged.
        errors_before = tls_metric(g, second["ca"], "seekgate_tls_reload_errors_total")
        shutil.copy(first["server_key"], live / "server-key.pem")
        assert wait_for(lambda: tls_metric(g, second["ca"], "seekgate_tls_reload_errors_total") > errors_before, 10)
        assert tls_metric(g, second["ca"], "seekgate_tls_reloads_total") == 1
        assert served_fingerprint(port) == fingerprint(second["server_cert"])
        assert https_call(port, ssl.create_default_context(cafile=str(second["ca"])), "/v2/health/ready")[0] == 200
    finally:
        g.stop()


def test_grpc_rotation_new_connections_get_the_new_cert_and_an_open_stream_survives(
        triton: TritonProcess, tmp_path: Path) -> None:
    first, second = make_dev_certs(tmp_path / "first"), make_dev_certs(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server_cert", "server_key"):
        shutil.copy(first[name], live / first[name].name)
    g = Gateway(tmp_path / "gw", triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}",
                   "server.tls_cert_file": str(live / "server.pem"), "server.tls_key_file": str(live / "server-key.pem"),
                   "server.tls_reload_interval_s": 0.2}).start()
    port = g.settings.server.grpc_port
    try:
        _, key = g.key(owner="grot")
        assert served_fingerprint(port) == fingerprint(first["server_cert"])
        client = grpcclient.InferenceServerClient(f"localhost:{port}", ssl=True, root_certificates=str(first["ca"]))
        got: list[object] = []

        def on(result: object, error: object) -> None:
            got.append(error or result)

        def stream_answers(n: int) -> bool:
            return wait_for(lambda: len(got) >= n, 60)
        try:
            # A stream opened before the swap, over a connection verified by the first CA.
            client.start_stream(on, headers={"authorization": f"Bearer {key}"})
            client.async_stream_infer("deepseek_stream", text_inputs(grpcclient, "before", 2))
            assert stream_answers(2), got
            time.sleep(1.0)   # the first request's answers are all in: what follows is the second's
            before = len(got)
            for name in ("server_cert", "server_key"):
                tmp = live / (second[name].name + ".new")
                shutil.copy(second[name], tmp)
                tmp.replace(live / second[name].name)
            assert wait_for(lambda: served_fingerprint(port) == fingerprint(second["server_cert"]), 10)
            # The same stream, after the swap: still open, still served.
            client.async_stream_infer("deepseek_stream", text_inputs(grpcclient, "after", 2))
            assert stream_answers(before + 2), got
            client.stop_stream()
            assert all(isinstance(r, grpcclient.InferResult) for r in got), got
        finally:
            client.close()
        # A new connection is verified by the new CA, and no longer by the old one.
        fresh = grpcclient.InferenceServerClient(f"localhost:{port}", ssl=True, root_certificates=str(second["ca"]))
        try:
            assert fresh.infer("deepseek", text_inputs(grpcclient, "new", 2),
                               headers={"authorization": f"Bearer {key}"}).as_numpy("text_output") is not None
        finally:
            fresh.close()
        stale = grpcclient.InferenceServerClient(f"localhost:{port}", ssl=True, root_certificates=str(first["ca"]))
        try:
            with pytest.raises(Exception, match="(?i)unavailable"):
                stale.is_server_live(client_timeout=10)
        finally:
            stale.close()
    finally:
        g.stop()


def rsa_pair(out: Path) -> tuple[Path, Path]:
    """A self-signed RSA certificate and key for localhost, made as an operator would (openssl req)."""
    out.mkdir(parents=True, exist_ok=True)
    cert, key = out / "server.pem", out / "server-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def served_fingerprint_by_name(port: int, server_name: str) -> str:
    """As served_fingerprint, with SNI: a client that names the server (127.0.0.1 is never sent as SNI)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


def move_into_place(src: Path, dst: Path) -> None:
    """cert-manager's way: a new file renamed over the old one."""
    tmp = dst.with_name(dst.name + ".new")
    shutil.copy(src, tmp)
    tmp.replace(dst)


def test_rotation_to_another_key_type_serves_only_the_new_certificate_on_every_listener(
        triton: TritonProcess, tmp_path: Path) -> None:
    """EC to RSA: OpenSSL keeps one certificate per key type in a context, so loading the new pair into the
    live one served the old EC certificate to every client that accepts ECDSA (nearly all) until a restart."""
    first = make_dev_certs(tmp_path / "first")
    rsa_cert, rsa_key = rsa_pair(tmp_path / "rsa")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server_cert", "server_key"):
        shutil.copy(first[name], live / first[name].name)
    g = Gateway(tmp_path / "gw", triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}",
                   "server.tls_cert_file": str(live / "server.pem"), "server.tls_key_file": str(live / "server-key.pem"),
                   "server.tls_reload_interval_s": 0.2}).start()
    s = g.settings.server
    ports = (s.http_port, s.grpc_port, s.metrics_port)
    try:
        assert all(served_fingerprint(port) == fingerprint(first["server_cert"]) for port in ports)
        move_into_place(rsa_key, live / "server-key.pem")
        move_into_place(rsa_cert, live / "server.pem")
        want = fingerprint(rsa_cert)
        assert wait_for(lambda: all(served_fingerprint(port) == want for port in ports), 10), \
            [served_fingerprint(port) == want for port in ports]
        assert all(served_fingerprint_by_name(port, "localhost") == want for port in ports)
        # A real gRPC client, which offers ECDSA first, verifies the new RSA certificate.
        client = grpcclient.InferenceServerClient(f"localhost:{s.grpc_port}", ssl=True, root_certificates=str(rsa_cert))
        try:
            assert client.is_server_live()
        finally:
            client.close()
        rsa_only = ssl.create_default_context(cafile=str(rsa_cert))
        assert https_call(s.http_port, rsa_only, "/v2/health/ready")[0] == 200
        assert tls_metric(g, rsa_cert, "seekgate_tls_reload_errors_total") == 0
    finally:
        g.stop()


def test_a_changed_client_ca_is_picked_up_on_http_and_grpc(triton: TritonProcess, tmp_path: Path) -> None:
    """The client CA file is watched like the pair: after it changes, the new CA's clients are let in and the
    old CA's refused (the live context kept its verify store forever)."""
    first, second = make_dev_certs(tmp_path / "first"), make_dev_certs(tmp_path / "second")
    live_ca = tmp_path / "client-ca.pem"
    shutil.copy(first["ca"], live_ca)
    g = Gateway(tmp_path / "gw", triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}",
                   **tls_overrides(first), "server.tls_client_ca_file": str(live_ca)}).start()
    s = g.settings.server

    def https_status(client: dict[str, Path]) -> int | None:
        ctx = client_context(first)   # the server's certificate stays the first CA's
        ctx.load_cert_chain(str(client["client_cert"]), str(client["client_key"]))
        try:
            return https_call(s.http_port, ctx, "/v2/health/ready")[0]
        except (ssl.SSLError, ConnectionError):
            return None

    def grpc_live(client: dict[str, Path]) -> bool:
        c = grpcclient.InferenceServerClient(f"localhost:{s.grpc_port}", ssl=True, root_certificates=str(first["ca"]),
                                             private_key=str(client["client_key"]),
                                             certificate_chain=str(client["client_cert"]))
        try:
            return bool(c.is_server_live(client_timeout=10))
        except Exception:   # noqa: BLE001  a refused handshake surfaces as UNAVAILABLE
            return False
        finally:
            c.close()
    # A client of the old CA that keeps its TLS session, to resume it after the change.
    resumer = client_context(first, client_cert=True)

    def resumed_status(session: ssl.SSLSession | None) -> tuple[int | None, ssl.SSLSession | None]:
        try:
            with socket.create_connection(("127.0.0.1", s.http_port), timeout=10) as raw, \
                    resumer.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = tls.recv(12)   # a TLS 1.3 session arrives after the handshake: read first
                return (int(answer[9:12]) if answer else None), tls.session
        except (ssl.SSLError, ConnectionError):
            return None, None
    try:
        assert https_status(first) == 200 and grpc_live(first)
        assert https_status(second) is None and not grpc_live(second)
        status, session = resumed_status(None)
        assert status == 200
        move_into_place(second["ca"], live_ca)   # the CA alone changes: no touch of the pair
        assert wait_for(lambda: https_status(second) == 200, 10)
        assert https_status(first) is None
        # Resuming is no way around it: a resumed session is not verified again, so none is offered.
        assert resumed_status(session)[0] is None
        assert grpc_live(second) and not grpc_live(first)
        scrape = client_context(first)   # the metrics listener shares the HTTP context: the new CA's client
        scrape.load_cert_chain(str(second["client_cert"]), str(second["client_key"]))
        body = https_call(s.metrics_port, scrape, "/metrics")[2].decode()
        assert [m.value for f in text_string_to_metric_families(body) for m in f.samples
                if m.name == "seekgate_tls_reloads_total"] == [1]
    finally:
        g.stop()


def test_with_tls12_allowed_a_session_of_the_old_client_ca_is_not_resumed_after_a_change(
        triton: TritonProcess, tmp_path: Path) -> None:
    """TLS 1.2 resumes by session id from the server's cache, without verifying the client again: the old CA's
    client, holding a session from before the change, was let back in. Under mTLS no session is resumed."""
    first, second = make_dev_certs(tmp_path / "first"), make_dev_certs(tmp_path / "second")
    live_ca = tmp_path / "client-ca.pem"
    shutil.copy(first["ca"], live_ca)
    g = Gateway(tmp_path / "gw", triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}", **tls_overrides(first),
                   "server.tls_client_ca_file": str(live_ca), "server.tls_min_version": "1.2"}).start()
    old_client = client_context(first, client_cert=True)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2

    def ready(session: ssl.SSLSession | None) -> tuple[bytes, ssl.SSLSession | None]:
        """The status line the old CA's client reads (offering `session`; b"" if refused), and its session."""
        try:
            with socket.create_connection(("127.0.0.1", g.settings.server.http_port), timeout=10) as raw, \
                    old_client.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := tls.recv(65536):   # to the server's close: a clean end keeps the session resumable
                    answer += chunk
                return answer.partition(b"\r\n")[0], tls.session
        except (ssl.SSLError, ConnectionError):
            return b"", None
    try:
        status, session = ready(None)
        assert status == b"HTTP/1.1 200 OK" and session is not None
        move_into_place(second["ca"], live_ca)
        assert wait_for(lambda: ready(None)[0] == b"", 10)   # a full handshake is refused: the new CA is in force
        assert ready(session) == (b"", None)
    finally:
        g.stop()


def test_a_renewal_to_an_encrypted_key_is_a_broken_file_even_with_a_terminal(triton: TritonProcess,
                                                                             tmp_path: Path) -> None:
    """`serve` started from a terminal: OpenSSL asked for the new key's passphrase on it and waited, inside the
    reload, so the event loop (every listener) stopped until someone typed. It is refused like any broken file."""
    certs = make_dev_certs(tmp_path / "certs")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server_cert", "server_key"):
        shutil.copy(certs[name], live / certs[name].name)
    http_port, grpc_port, metrics_port = free_ports(3)
    config = tmp_path / "seekgate.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "server": {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
                   "tls_cert_file": str(live / "server.pem"), "tls_key_file": str(live / "server-key.pem"),
                   "tls_reload_interval_s": 0.2},
        "upstream": {"http_url": triton.http_url, "grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"},
        "policy": {"directory": str(Path(__file__).resolve().parents[2] / "policies")},
    }))
    terminal, terminal_side = os.openpty()

    def take_the_terminal() -> None:   # in the child, a session leader (start_new_session): its controlling tty
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                            cwd=Path(__file__).resolve().parents[2], stdin=terminal_side,
                            stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=take_the_terminal)
    os.close(terminal_side)

    def reload_errors() -> float | None:
        try:
            return tls_metric_at(metrics_port, certs["ca"], "seekgate_tls_reload_errors_total")
        except OSError:   # not up yet, or its event loop stopped
            return None
    try:
        assert wait_for(lambda: reload_errors() == 0, 60), (tmp_path / "serve.log").read_text()[-2000:]
        key = load_pem_private_key(certs["server_key"].read_bytes(), None)
        encrypted = tmp_path / "encrypted-key.pem"
        encrypted.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pass")))
        move_into_place(encrypted, live / "server-key.pem")
        assert wait_for(lambda: (reload_errors() or 0) >= 1, 20), (tmp_path / "serve.log").read_text()[-2000:]
        assert served_fingerprint(http_port) == fingerprint(certs["server_cert"])
        assert "the TLS private key is encrypted" in (tmp_path / "serve.log").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()   # a loop blocked on the terminal never handles SIGTERM
            proc.wait(30)
        os.close(terminal)


# ------------------------------------------------------------------ secure by default


@pytest.fixture(scope="module")
def hsts_gw(triton: TritonProcess, certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """TLS with HSTS turned on, and the plain-HTTP status listener beside it."""
    status_port = free_ports(1)[0]
    g = Gateway(tmp_path_factory.mktemp("gw-hsts"), triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}", **tls_overrides(certs),
                   "server.hsts_max_age_s": 31536000, "server.hsts_include_subdomains": True,
                   "server.status_listen": f"127.0.0.1:{status_port}"}).start()
    yield g
    g.stop()


def test_hsts_when_turned_on_is_sent_over_tls_by_the_api_and_the_console_never_by_the_status_listener(
        hsts_gw: Gateway, tls_gw: Gateway, certs: dict[str, Path]) -> None:
    s, ctx = hsts_gw.settings.server, client_context(certs)
    _, key = hsts_gw.key(owner="hsts-user")
    answers = {"ready": https_call(s.http_port, ctx, "/v2/health/ready"),
               "served": https_call(s.http_port, ctx, GENERATE, key, {"text_input": "Hi", "max_tokens": 2}),
               "refused": https_call(s.http_port, ctx, GENERATE, "sgk_not_a_key", {"text_input": "Hi"}),
               "unknown route": https_call(s.http_port, ctx, "/nope", key),
               "console": https_call(s.http_port, ctx, "/console/signin")}
    assert [(name, status) for name, (status, _, _) in answers.items()] == [
        ("ready", 200), ("served", 200), ("refused", 401), ("unknown route", 404), ("console", 200)]
    for name, (_, headers, _) in answers.items():
        assert headers.get("Strict-Transport-Security") == "max-age=31536000; includeSubDomains", name
    # The status listener is plain HTTP (kubelet probes): HSTS there would be a header over plaintext.
    host, port = s.status_listen.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/v2/health/ready")
        probe = conn.getresponse()
        probe.read()
    finally:
        conn.close()
    assert probe.status == 200 and probe.getheader("Strict-Transport-Security") is None
    # Off by default, TLS or not: HSTS holds every port of the hostname to HTTPS (a plain-HTTP Grafana beside it too).
    for path in ("/v2/health/ready", "/console/signin"):
        status, headers, _ = https_call(tls_gw.settings.server.http_port, client_context(certs), path)
        assert status == 200 and "Strict-Transport-Security" not in headers, path


def test_serve_refuses_a_public_bind_without_tls_and_names_the_fix(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SEEKGATE_SERVER_HOST": "0.0.0.0", "SEEKGATE_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "proxy", "serve"], capture_output=True, text=True, env=env,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2
    assert "server.tls_cert_file" in done.stderr and "--insecure-plaintext" in done.stderr


def test_insecure_plaintext_on_a_public_bind_starts_and_says_so(triton: TritonProcess, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    g = Gateway(tmp_path, triton.http_url, free_ports(3),
                **{"server.host": "0.0.0.0", "server.insecure_plaintext": True}).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", g.settings.server.http_port, timeout=10)
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().status == 200
        assert any("insecure_plaintext" in r.getMessage() for r in caplog.records)
    finally:
        g.stop()
