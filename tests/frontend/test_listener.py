"""listener.py and the guarded handler against the real kernel: a shutdown serves what was queued or accepted, refuses what came
after; "::" takes IPv4 and IPv6 clients on every listener of a real seekgate."""

from __future__ import annotations

import asyncio
import errno
import http.client
import select
import shutil
import socket
import ssl
from pathlib import Path

import grpc
import pytest
import yaml
from aiohttp import web
from tritonclient.grpc import service_pb2, service_pb2_grpc

from proxy.cli.devcert import make_dev_certs
from proxy.frontend.http_guard import FIRST_REQUEST_GRACE_S, GuardedRunner
from proxy.frontend.listener import listen_on, queued, quiesce
from proxy.local.triton import TritonProcess, free_ports
from tests.gateway import REPO, Gateway, audit_records, wait_for


async def test_a_listener_closes_serving_what_was_queued_and_refusing_what_came_after() -> None:
    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # Connected while the loop is busy (these connects block it): complete, queued, not accepted.
    early = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
    late = socket.socket()
    try:
        assert queued(server.sockets[0]) == 5
        assert await quiesce(server.sockets) == 0   # the loop has accepted all five
        late.setblocking(False)
        late.connect_ex(("127.0.0.1", port))
        # Its handshake is dropped at the listener: not connected, though the listener is still open.
        assert select.select([], [late], [], 0.3)[1] == []
        server.close()
        await server.wait_closed()
        for client in early:   # served, not reset by the close
            assert client.recv(5) == b"hello"
        # Its SYN, retried once the listener is gone, is refused: it never sent a byte.
        assert select.select([], [late], [], 5)[1] == [late]
        assert late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
    finally:
        for client in (*early, late):
            client.close()


async def start_guarded(shutdown_timeout: float = 5.0) -> tuple[web.AppRunner, int]:
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/", echo)
    runner = GuardedRunner(app, header_timeout_s=30.0, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.mark.parametrize("request_parts", [
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    # The body comes after the headers: aiohttp's shutdown would drop it (the handler then waits forever).
    [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", b"hello"],
], ids=["get", "post-body-later"])
async def test_a_connection_whose_request_comes_just_after_the_shutdown_began_is_served(
        request_parts: list[bytes]) -> None:
    runner, port = await start_guarded()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.sleep(0.05)   # accepted, nothing sent yet: what quiesce() hands the loop
        cleanup = asyncio.create_task(runner.cleanup())
        for part in request_parts:
            await asyncio.sleep(0.1)    # aiohttp's shutdown has closed its idle connections by now
            writer.write(part)
        answer = await asyncio.wait_for(reader.read(), 5)   # the whole answer, then the close
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello"), answer
        await asyncio.wait_for(cleanup, 5)
    finally:
        writer.close()


async def test_a_connection_that_never_sends_is_closed_after_the_grace_not_the_drain_timeout() -> None:
    runner, port = await start_guarded(shutdown_timeout=20.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(runner.cleanup(), 10)
        assert FIRST_REQUEST_GRACE_S * 0.9 <= loop.time() - started < FIRST_REQUEST_GRACE_S + 2
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


# ------------------------------------------------------------------ server.host "::": dual-stack

def test_listen_on_binds_double_colon_dual_stack_and_shares_it_between_workers() -> None:
    """Two workers' sockets on one port (SO_REUSEPORT kept), each taking IPv4 and IPv6 clients."""
    first = listen_on("::", 0, reuse_port=True)["sock"]
    second = listen_on("::", first.getsockname()[1], reuse_port=True)["sock"]
    try:
        for sock in (first, second):
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        first.listen()
        port = first.getsockname()[1]
        for client_host in ("127.0.0.1", "::1"):
            with socket.create_connection((client_host, port), timeout=5):
                pass
    finally:
        first.close()
        second.close()
    # Anything else is left to asyncio, as before: a name, an IPv4 address, one IPv6 address.
    assert listen_on("::1", 8000) == {"host": "::1", "port": 8000, "reuse_port": None}
    assert listen_on("localhost", 8000, reuse_port=True) == {"host": "localhost", "port": 8000, "reuse_port": True}


V4_DENY_RULE = {"rules": [{"id": "deny-server-read-from-v4-loopback", "effect": "deny",
                           "resources": ["server"], "actions": ["read"],
                           "environment": {"client_ips": ["127.0.0.1/32"]}}]}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


def dual_stack_gateway(root: Path, triton: TritonProcess, certs: dict[str, Path] | None) -> Gateway:
    """A seekgate on "::" (TLS with `certs`) whose policy denies server reads from 127.0.0.1 alone."""
    policies = root / "policies"
    shutil.copytree(REPO / "policies", policies)
    (policies / "zz-v4.yaml").write_text(yaml.safe_dump(V4_DENY_RULE))
    tls: dict[str, object] = ({"server.tls_cert_file": str(certs["server_cert"]),
                               "server.tls_key_file": str(certs["server_key"])} if certs
                              else {"server.insecure_plaintext": True})
    return Gateway(root, triton.http_url, free_ports(3), **{
        "server.host": "::", "upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}", **tls}).start()


def http_get(client_host: str, port: int, path: str, key: str | None, tls: ssl.SSLContext | None) -> int:
    conn = (http.client.HTTPSConnection(client_host, port, context=tls, timeout=30) if tls
            else http.client.HTTPConnection(client_host, port, timeout=30))
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def grpc_model_ready(target: str, key: str, ca: Path | None) -> bool:
    channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()))
               if ca else grpc.insecure_channel(target))
    with channel:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelReady(
            service_pb2.ModelReadyRequest(name="deepseek"), metadata=(("authorization", f"Bearer {key}"),),
            timeout=30).ready


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_gateway_on_double_colon_serves_ipv4_and_ipv6_clients_and_sees_ipv4_as_ipv4(
        scheme: str, triton: TritonProcess, certs: dict[str, Path], tmp_path: Path) -> None:
    """server.host "::" is every address, as grpc and nginx read it: asyncio's create_server set IPV6_V6ONLY, so
    an IPv4 client was refused on every HTTP listener. An IPv4 client of the dual-stack socket arrives as
    ::ffff:127.0.0.1: the key's CIDRs, the policy's client_ips and the audit record all see 127.0.0.1."""
    gw = dual_stack_gateway(tmp_path, triton, certs if scheme == "https" else None)
    tls = ssl.create_default_context(cafile=str(certs["ca"])) if scheme == "https" else None
    s = gw.settings.server
    try:
        _, v4_key = gw.key(owner="v4", allowed_cidrs=("127.0.0.1/32",))
        _, v6_key = gw.key(owner="v6", allowed_cidrs=("::1/128",))
        # The key bound to 127.0.0.1 is taken over IPv4 and refused over IPv6 (and the other way round).
        assert http_get("127.0.0.1", s.http_port, "/v2/models/deepseek", v4_key, tls) == 200
        assert http_get("::1", s.http_port, "/v2/models/deepseek", v4_key, tls) == 401
        assert http_get("::1", s.http_port, "/v2/models/deepseek", v6_key, tls) == 200
        assert http_get("127.0.0.1", s.http_port, "/v2/models/deepseek", v6_key, tls) == 401
        # The policy's client_ips rule applies to the IPv4 client only.
        _, any_key = gw.key(owner="any")
        assert http_get("127.0.0.1", s.http_port, "/v2", any_key, tls) == 403
        assert http_get("::1", s.http_port, "/v2", any_key, tls) == 200
        # gRPC: grpc's own dual-stack port, or over TLS the listener of grpc_tls.py.
        ca = certs["ca"] if scheme == "https" else None
        assert grpc_model_ready(f"127.0.0.1:{s.grpc_port}", v4_key, ca)
        assert grpc_model_ready(f"[::1]:{s.grpc_port}", v6_key, ca)
        # The metrics listener too.
        for client_host in ("127.0.0.1", "::1"):
            assert http_get(client_host, s.metrics_port, "/metrics", None, tls) == 200

        # A request the parser refuses is audited with the peer's address alone (http_guard.audit_unparsed).
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as raw:
            conn = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
            conn.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n")
            assert conn.recv(12).endswith(b" 400")
        assert wait_for(lambda: any(r["reason"].startswith("http_parser") for r in audit_records(gw)), 10)
        assert {r["client_ip"] for r in audit_records(gw) if r["reason"].startswith("http_parser")} == {"127.0.0.1"}

        def seen() -> set[tuple[object, ...]]:
            return {(r.get("actor"), r.get("protocol", "http"), r["client_ip"]) for r in audit_records(gw)
                    if r.get("actor") in ("v4", "v6", "any")}
        expected = {("v4", "http", "127.0.0.1"), ("v6", "http", "::1"), ("any", "http", "127.0.0.1"),
                    ("any", "http", "::1"), ("v4", "grpc", "127.0.0.1"), ("v6", "grpc", "::1")}
        assert wait_for(lambda: seen() >= expected, 10), seen()
        assert {ip for *_, ip in seen()} == {"127.0.0.1", "::1"}   # never ::ffff:127.0.0.1
    finally:
        gw.stop()
