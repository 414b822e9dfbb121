"""`server.status_listen`: liveness and readiness on their own plain-HTTP address, the real Triton behind them."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cli.devcert import make_dev_certs
from proxy.local.triton import TritonProcess, free_ports
from tests.frontend.test_tls import client_context, https_call, tls_overrides
from tests.gateway import Gateway, audit_records, wait_for

PROBES = ("/v2/health/live", "/v2/health/ready")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def status_gw(triton: TritonProcess, certs: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """mTLS on the API listener (no client gets in without a certificate) and a status listener beside it."""
    status_port = free_ports(1)[0]
    g = Gateway(tmp_path_factory.mktemp("gw-status"), triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}", **tls_overrides(certs, mtls=True),
                   "server.status_listen": f"127.0.0.1:{status_port}", "server.shutdown_delay_s": 5.0}).start()
    yield g
    g.stop()


def status_url(gw: Gateway) -> str:
    return f"http://{gw.settings.server.status_listen}"


def plain_call(url: str, method: str = "GET", headers: dict[str, str] | None = None,
               body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One plain-HTTP request, as kubelet's httpGet probe makes it (no TLS, no credential unless given)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_probes_answer_in_plaintext_without_a_certificate_as_the_api_listener_does(
        status_gw: Gateway, certs: dict[str, Path]) -> None:
    """Under mTLS kubelet's httpGet probes (no client certificate) cannot reach the API listener's health
    endpoints; the status listener gives them the same answers."""
    s = status_gw.settings.server
    with pytest.raises(ssl.SSLError):   # the API listener: no certificate, no handshake
        https_call(s.http_port, client_context(certs), "/v2/health/ready")
    for path in PROBES:
        api_status, _, api_body = https_call(s.http_port, client_context(certs, client_cert=True), path)
        status, headers, body = plain_call(status_url(status_gw) + path)
        assert (status, body) == (api_status, api_body) == (200, b""), path
        assert headers["Server"] == "seekgate"
        # A query is no way around the path check, and is passed on to Triton with the probe.
        assert plain_call(status_url(status_gw) + path + "?verbose=1")[0] == 200
    # Served requests are audited like the API listener's probes (2 there, 4 here).
    assert wait_for(lambda: sum(r["action"] == "health" and r["http_status"] == 200
                                for r in audit_records(status_gw)) >= 6, 10), audit_records(status_gw)[-3:]


def test_the_status_listener_serves_nothing_else(status_gw: Gateway) -> None:
    """No credential is asked for there, so nothing a credential guards is reachable, with one or without."""
    _, key = status_gw.key(owner="status-prober")
    auth = {"Authorization": f"Bearer {key}"}
    asks = [("GET", "/v2/models/deepseek", auth, None), ("GET", "/v2/models/deepseek", None, None),
            ("POST", "/v2/models/deepseek/generate", auth, json.dumps({"text_input": "hi"}).encode()),
            ("GET", "/metrics", None, None), ("GET", "/admin/v1/keys", auth, None), ("GET", "/console/", None, None),
            ("HEAD", "/v2/health/live", None, None), ("POST", "/v2/health/ready", None, b""),
            ("GET", "/v2/health/live/", None, None), ("GET", "/v2/health/readyz", None, None), ("GET", "/", None, None)]
    for method, path, headers, body in asks:
        status, answer_headers, answer = plain_call(status_url(status_gw) + path, method, headers, body)
        assert status == 404, (method, path, status)
        if method != "HEAD":
            assert json.loads(answer) == {"error": "not found"}, (method, path)
        assert answer_headers["Server"] == "seekgate"
    # Refusals are audited too.
    assert wait_for(lambda: any(r["reason"] == "status_listener_serves_probes_only" and r["http_status"] == 404
                                for r in audit_records(status_gw)), 10)


def test_liveness_there_is_seekgates_own_and_holds_with_triton_unreachable(tmp_path: Path) -> None:
    """The kubelet restarts a container whose liveness fails: through Triton's own /v2/health/live (what the
    API listener forwards) a Triton restart or checkpoint load would restart seekgate too. Readiness still
    follows Triton, so the pod leaves the Service instead."""
    http, grpc_, metrics, status_port, dead = free_ports(5)   # nothing listens on `dead`
    gw = Gateway(tmp_path, f"http://127.0.0.1:{dead}", [http, grpc_, metrics],
                 **{"server.status_listen": f"127.0.0.1:{status_port}"}).start()
    try:
        assert plain_call(gw.url + "/v2/health/live")[0] == 503   # the API listener: Triton's liveness
        status, headers, body = plain_call(status_url(gw) + "/v2/health/live")
        assert (status, body) == (200, b"") and headers["X-Request-Id"]
        assert plain_call(status_url(gw) + "/v2/health/ready")[0] == 503
        assert wait_for(lambda: any(r["request_id"] == headers["X-Request-Id"] and r["action"] == "health"
                                    and (r["status"], r["http_status"]) == ("allowed", 200)
                                    for r in audit_records(gw)), 10), audit_records(gw)[-3:]
    finally:
        gw.stop()


def test_the_status_listener_is_closed_before_the_audit_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shutdown drains the API listeners and then closes the audit writer. A probe the status listener answered
    after that would be a served request whose record is lost ("audit writer closed, record not persisted"):
    the listener must be closed by then, its last probes audited."""
    from proxy.audit.writer import AuditWriter
    real_close = AuditWriter.close
    http, grpc_, metrics, status_port, dead = free_ports(5)
    after: list[object] = []

    async def close_then_probe(self: AuditWriter) -> None:
        await real_close(self)
        # A kubelet's probe at this moment, from another thread: the loop is free to answer it.
        try:
            after.append(await asyncio.to_thread(plain_call, f"http://127.0.0.1:{status_port}/v2/health/live"))
        except OSError as exc:   # refused: nothing listens any more
            after.append(exc)

    monkeypatch.setattr(AuditWriter, "close", close_then_probe)
    gw = Gateway(tmp_path, f"http://127.0.0.1:{dead}", [http, grpc_, metrics],
                 **{"server.status_listen": f"127.0.0.1:{status_port}"}).start()
    status, headers, _ = plain_call(status_url(gw) + "/v2/health/live")
    assert status == 200
    gw.stop()
    assert len(after) == 1 and isinstance(after[0], OSError), after
    # The probe answered before the shutdown was audited: it was served while the writer was open.
    assert any(r["request_id"] == headers["X-Request-Id"] for r in audit_records(gw))


def test_readiness_fails_on_the_status_listener_too_while_draining(status_gw: Gateway) -> None:
    """The same readiness as the API listener's: 503 from the moment a shutdown starts (shutdown_delay_s 5 s
    here, while requests are still taken), so the kubelet takes the pod out of service. Runs last: it stops it."""
    url = status_url(status_gw)
    assert plain_call(url + "/v2/health/ready")[0] == 200
    assert status_gw._loop is not None and status_gw._stop is not None
    status_gw._loop.call_soon_threadsafe(status_gw._stop.set)
    assert wait_for(lambda: plain_call(url + "/v2/health/ready")[0] == 503, 10)
    status, _, body = plain_call(url + "/v2/health/ready")
    assert (status, json.loads(body)) == (503, {"error": "shutting down"})
    assert plain_call(url + "/v2/health/live")[0] == 200   # alive while it drains
