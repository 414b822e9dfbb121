"""seekgate to Triton over TLS: gRPC against a real tritonserver with --grpc-use-ssl; HTTPS against a stand-in.

Triton's HTTP endpoint has no TLS of its own (deployments put it behind a TLS proxy), so the https:// pool
path is proven against a small aiohttp TLS server standing in for Triton; the gRPC path against the real one.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from aiohttp import web

from proxy.cli.devcert import make_dev_certs
from proxy.local.triton import TritonLaunch, TritonProcess, free_ports
from tests.conftest import REPO
from tests.gateway import Gateway, audit_records, wait_for


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_certs(tmp_path_factory.mktemp("upstream-certs"))


@pytest.fixture(scope="module")
def tls_triton(certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """The real tritonserver (tests/models: echo) with its gRPC endpoint on TLS, made by `seekgate tls dev-cert`."""
    http, grpc_, metrics = free_ports(3)
    launch = TritonLaunch(REPO / "tests" / "models", tmp_path_factory.mktemp("tls-triton"), None, http_port=http,
                          grpc_port=grpc_, metrics_port=metrics, config_name="default", startup_timeout_s=120,
                          extra_args=("--grpc-use-ssl=true", f"--grpc-server-cert={certs['server_cert']}",
                                      f"--grpc-server-key={certs['server_key']}"))
    proc = TritonProcess(launch).__enter__()
    yield proc
    proc.stop()


def echo_inputs() -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"over tls"]], dtype=np.object_))
    return [text]


def grpc_gateway(root: Path, triton: TritonProcess, ca: Path) -> Gateway:
    return Gateway(root, triton.http_url, free_ports(3), **{
        "upstream.grpc_target": f"localhost:{triton.launch.grpc_port}", "upstream.grpc_tls": True,
        "upstream.ca_file": str(ca)}).start()


def test_triton_grpc_is_really_on_tls(tls_triton: TritonProcess, certs: dict[str, Path]) -> None:
    """What the next tests prove is worth proving: Triton refuses plaintext gRPC and serves TLS."""
    plain = grpcclient.InferenceServerClient(f"127.0.0.1:{tls_triton.launch.grpc_port}")
    with pytest.raises(Exception, match="(?i)unavailable"):
        plain.is_server_live(client_timeout=5)
    plain.close()
    secure = grpcclient.InferenceServerClient(f"localhost:{tls_triton.launch.grpc_port}", ssl=True,
                                              root_certificates=str(certs["ca"]))
    assert secure.is_server_live()
    secure.close()


def test_grpc_through_seekgate_to_a_tls_triton(tls_triton: TritonProcess, certs: dict[str, Path],
                                               tmp_path: Path) -> None:
    gw = grpc_gateway(tmp_path, tls_triton, certs["ca"])
    try:
        _, key = gw.key(owner="tlsup", roles=("user",))
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gw.settings.server.grpc_port}")
        try:
            result = client.infer("echo", echo_inputs(), headers={"authorization": f"Bearer {key}"})
        finally:
            client.close()
        echoed = json.loads(result.as_numpy("echo").reshape(-1)[0])
        assert "over tls" in json.dumps(echoed)
        assert wait_for(lambda: any(r["actor"] == "tlsup" and r["status"] == "allowed" and r["protocol"] == "grpc"
                                    for r in audit_records(gw)), 5)
    finally:
        gw.stop()


def test_grpc_to_a_triton_whose_certificate_is_not_trusted_fails_closed(
        tls_triton: TritonProcess, certs: dict[str, Path], tmp_path: Path) -> None:
    other = make_dev_certs(tmp_path / "other")
    gw = grpc_gateway(tmp_path / "gw", tls_triton, other["ca"])
    try:
        _, key = gw.key(owner="untrusted", roles=("user",))
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gw.settings.server.grpc_port}")
        try:
            with pytest.raises(Exception, match="UNAVAILABLE"):
                client.infer("echo", echo_inputs(), headers={"authorization": f"Bearer {key}"}, client_timeout=20)
        finally:
            client.close()
    finally:
        gw.stop()


# ------------------------------------------------------------------ https:// upstream (a stand-in: Triton has no HTTP TLS)


class TlsStandIn:
    """An aiohttp HTTPS server answering like Triton's generate endpoint, saying which TLS version it saw."""

    def __init__(self, certs: dict[str, Path]) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certs["server_cert"]), str(certs["server_key"]))
        self.port = free_ports(1)[0]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _generate(self, request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        body = await request.json()
        return web.json_response({"model_name": request.match_info["model"], "text_output": body["text_input"][::-1],
                                  "tls": ssl_object.version() if ssl_object else None})

    async def _ready_answer(self, _: web.Request) -> web.Response:
        return web.Response()

    async def _main(self) -> None:
        app = web.Application()
        app.router.add_get("/v2/health/ready", self._ready_answer)
        app.router.add_post("/v2/models/{model}/generate", self._generate)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.context).start()
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> TlsStandIn:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def generate(gw: Gateway, key: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(f"{gw.url}/v2/models/deepseek/generate", method="POST",
                                     data=json.dumps({"text_input": "abc", "max_tokens": 2}).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_https_upstream_pool_verifies_with_the_ca_file(certs: dict[str, Path], tmp_path: Path) -> None:
    with TlsStandIn(certs) as stand_in:
        gw = Gateway(tmp_path / "ok", f"https://127.0.0.1:{stand_in.port}", free_ports(3),
                     **{"upstream.ca_file": str(certs["ca"])}).start()
        try:
            _, key = gw.key(owner="https-up")
            status, body = generate(gw, key)
            assert (status, body) == (200, {"model_name": "deepseek", "text_output": "cba", "tls": "TLSv1.3"})
        finally:
            gw.stop()
        # Fail closed: the same upstream without its CA (the system's store does not trust it) is not reached.
        gw = Gateway(tmp_path / "untrusted", f"https://127.0.0.1:{stand_in.port}", free_ports(3)).start()
        try:
            _, key = gw.key(owner="https-untrusted")
            status, body = generate(gw, key)
            assert status == 503, body
        finally:
            gw.stop()
