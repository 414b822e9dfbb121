"""seekgate's HTTP front end against the real Triton: forwarding, refusals, reload, audit, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient

from proxy.keys.format import _B62 as CHECK_ALPHABET
from proxy.keys.format import CHECK_LEN
from proxy.local.triton import TritonProcess
from proxy.paths import store_path
from proxy.store.sqlite import SqliteStore
from tests.conftest import free_ports
from tests.gateway import Gateway, audit_records, metric, wait_for
from tests.relay import TcpRelay
from tests.steps.test_authn import typo_at

ISSUED: list[str] = []
BODY_CAP = 1 << 20


@pytest.fixture(scope="module")
def relay(triton: TritonProcess) -> Iterator[TcpRelay]:
    r = TcpRelay("127.0.0.1", triton.launch.http_port).start()
    yield r
    r.stop()


class LogCapture(logging.Handler):
    """Everything seekgate logs during this module, to prove no key ever reaches a log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


LOGS = LogCapture()


@pytest.fixture(scope="module")
def gw(relay: TcpRelay, triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = logging.getLogger()
    root.addHandler(LOGS)
    previous_level = root.level
    root.setLevel(logging.DEBUG)
    yield from _gateway(relay, triton, tmp_path_factory)
    root.removeHandler(LOGS)
    root.setLevel(previous_level)


def _gateway(relay: TcpRelay, triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw"), f"http://127.0.0.1:{relay.port}", free_ports(3),
                triton_data_dir=triton.launch.data_dir, **{"server.max_body_bytes": BODY_CAP}).start()
    yield g
    g.stop()


def issue(gw: Gateway, **kw: Any) -> tuple[str, str]:
    key_id, token = gw.key(**kw)
    ISSUED.append(token)
    return key_id, token


@pytest.fixture(scope="module")
def user_key(gw: Gateway) -> str:
    return issue(gw, owner="alice", roles=("user",))[1]


@pytest.fixture(scope="module")
def admin_key(gw: Gateway) -> str:
    return issue(gw, owner="root-ops", roles=("admin",))[1]


def call(url: str, method: str = "GET", body: Any = None, key: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def infer_inputs(module: Any, text: str, max_tokens: int, binary: bool) -> list[Any]:
    a = module.InferInput("text_input", [1, 1], "BYTES")
    a.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_), binary_data=binary)
    b = module.InferInput("max_tokens", [1, 1], "INT32")
    b.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32), binary_data=binary)
    return [a, b]


# ------------------------------------------------------------------ forwarding


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_infer_same_as_direct(gw: Gateway, triton: TritonProcess, user_key: str, binary: bool) -> None:
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
               for n in ("text_output", "input_tokens", "output_tokens")]
    direct = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://")).infer(
        "deepseek", infer_inputs(httpclient, "Hello world", 5, binary), outputs=outputs)
    proxied = httpclient.InferenceServerClient(gw.url.removeprefix("http://")).infer(
        "deepseek", infer_inputs(httpclient, "Hello world", 5, binary), outputs=outputs, headers=bearer(user_key))
    for name in ("text_output", "input_tokens", "output_tokens"):
        assert (proxied.as_numpy(name) == direct.as_numpy(name)).all()
    assert proxied.as_numpy("output_tokens")[0, 0] == 5


def test_tritonclient_aio_infer_and_metadata(gw: Gateway, triton: TritonProcess, user_key: str) -> None:
    async def go() -> None:
        proxied = aiohttpclient.InferenceServerClient(gw.url.removeprefix("http://"))
        direct = aiohttpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
        try:
            a = await proxied.infer("deepseek", infer_inputs(aiohttpclient, "aio", 4, True), headers=bearer(user_key))
            b = await direct.infer("deepseek", infer_inputs(aiohttpclient, "aio", 4, True))
            assert a.as_numpy("text_output")[0, 0] == b.as_numpy("text_output")[0, 0]
            assert await proxied.get_model_metadata("deepseek", headers=bearer(user_key)) == \
                await direct.get_model_metadata("deepseek")
            assert await proxied.get_model_config("deepseek", headers=bearer(user_key)) == \
                await direct.get_model_config("deepseek")
        finally:
            await proxied.close()
            await direct.close()
    asyncio.run(go())


def test_generate_byte_identical_with_server_timing(gw: Gateway, triton: TritonProcess, user_key: str) -> None:
    body = {"text_input": "The quick brown fox", "max_tokens": 9}
    status, headers, proxied = call(gw.url + "/v2/models/deepseek/generate", "POST", body, user_key)
    _, direct_headers, direct = call(triton.http_url + "/v2/models/deepseek/generate", "POST", body)
    assert status == 200 and proxied == direct
    assert "seekgate;dur=" in headers["Server-Timing"] and "upstream;dur=" in headers["Server-Timing"]
    # Triton sends its generate answer chunked; seekgate, having it whole, sends it with its length.
    assert direct_headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in direct_headers
    assert headers["Content-Length"] == str(len(proxied)) and "Transfer-Encoding" not in headers


def test_generate_stream_passes_events_through(gw: Gateway, triton: TritonProcess, user_key: str) -> None:
    body = {"text_input": "Hello world", "max_tokens": 12}
    status, headers, proxied = call(gw.url + "/v2/models/deepseek_stream/generate_stream", "POST", body, user_key)
    _, _, direct = call(triton.http_url + "/v2/models/deepseek_stream/generate_stream", "POST", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert proxied == direct and proxied.count(b"data: ") > 1


def test_gzip_infer_body_passes_through_compressed(gw: Gateway, triton: TritonProcess, user_key: str) -> None:
    import gzip
    body = gzip.compress(json.dumps({"inputs": [
        {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["zipped"]},
        {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [3]}]}).encode())
    gz = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    status, _, proxied = call(gw.url + "/v2/models/deepseek/infer", "POST", body, user_key, gz)
    _, _, direct = call(triton.http_url + "/v2/models/deepseek/infer", "POST", body, None, gz)
    assert status == 200 and proxied == direct


def test_health_is_public_and_unknown_route_is_404(gw: Gateway, user_key: str, relay: TcpRelay) -> None:
    assert call(gw.url + "/v2/health/ready")[0] == 200
    assert call(gw.url + "/v2/health/live")[0] == 200
    relay.clear()
    status, _, body = call(gw.url + "/v2/nothing-here-xyz", key=user_key)
    assert status == 404 and b"nothing-here-xyz" not in relay.seen()


# ------------------------------------------------------------------ authentication


def test_401_for_every_bad_credential_with_one_body(gw: Gateway, user_key: str) -> None:
    url = gw.url + "/v2/models/deepseek"
    key_id, revoked = issue(gw, owner="bob")
    assert call(url, key=revoked)[0] == 200
    gw.revoke(key_id)
    _, expired = issue(gw, owner="carol", expires_in_s=0.5)
    time.sleep(1.0)
    flipped = user_key[:-1] + ("A" if user_key[-1] != "A" else "B")
    cases = {
        "none": call(url),
        "malformed": call(url, headers={"Authorization": "Bearer not-a-key"}),
        "basic": call(url, headers={"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"}),
        "bad checksum": call(url, key=flipped),
        "unknown": call(url, key=_unknown_key()),
        "expired": call(url, key=expired),
        "revoked": call(url, key=revoked),
        "query string": call(url + "?key=" + user_key),
    }
    bodies = set()
    for name, (status, headers, body) in cases.items():
        assert status == 401, name
        assert headers.get("WWW-Authenticate", "").startswith("Bearer"), name
        bodies.add(body)
    assert len(bodies) == 1


def test_a_typo_in_each_check_character_is_bad_checksum_and_never_looked_up(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each of the six check characters on its own: a change to the last one alone also fails the
    # hash, so only the audited reason shows the checksum (not the store) refused it.
    key_id, token = issue(gw, owner="typist")
    lookups: list[str] = []
    real_get_chain = SqliteStore.get_chain

    async def counted(self: SqliteStore, wanted: str) -> list[Any]:
        lookups.append(wanted)
        return await real_get_chain(self, wanted)
    monkeypatch.setattr(SqliteStore, "get_chain", counted)
    url = gw.url + "/v2/models/deepseek"
    refused = {}
    for pos in range(len(token) - CHECK_LEN, len(token)):
        status, headers, _ = call(url, key=typo_at(token, pos, CHECK_ALPHABET))
        assert status == 401, pos
        refused[headers["X-Request-Id"]] = pos
    assert lookups == []
    assert wait_for(lambda: refused.keys() <= {r["request_id"] for r in audit_records(gw)}, 5.0)
    reasons = {refused[r["request_id"]]: r["reason"] for r in audit_records(gw) if r["request_id"] in refused}
    assert reasons == {pos: "bad_checksum" for pos in refused.values()}
    assert call(url, key=token)[0] == 200 and lookups == [key_id]   # the untouched key is looked up


def test_revoking_an_ancestor_refuses_its_descendants_end_to_end(gw: Gateway, relay: TcpRelay) -> None:
    # Two guards: the store revokes a whole subtree at once (test_store), and authn refuses a key
    # with any dead ancestor on its own. The first device is refused after its app key's revocation
    # through the store (as by the CLI) while it sat in the key cache; the second's app key row
    # alone says revoked (a table edited by hand, a restore from before the cascade), so only
    # authn's walk of the chain can refuse it.
    url = gw.url + "/v2/models/deepseek/generate"
    refused = []
    for how in ("store", "row"):
        app_id, app_key = issue(gw, tier="app", owner=f"fleet-{how}")
        _, device_key = issue(gw, tier="device", owner=f"sensor-{how}", parent_id=app_id)
        if how == "store":
            for key in (app_key, device_key):   # both verified, and now in the key cache
                assert call(url, "POST", {"text_input": "before", "max_tokens": 1}, key)[0] == 200
            gw.revoke(app_id)
        else:
            with sqlite3.connect(store_path(gw.data_dir)) as raw:
                raw.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ?", (time.time(), app_id))
        relay.clear()
        marker = f"orphan-{uuid.uuid4().hex}"
        status, headers, _ = call(url, "POST", {"text_input": marker, "max_tokens": 1}, device_key)
        assert status == 401 and marker.encode() not in relay.seen(), how
        refused.append(headers["X-Request-Id"])
    assert wait_for(lambda: set(refused) <= {r["request_id"] for r in audit_records(gw)}, 5.0)
    # "revoked" in both, though in the second the device key's own row is not: its ancestor's is.
    assert [r["reason"] for r in audit_records(gw) if r["request_id"] in refused] == ["revoked", "revoked"]
    _, sibling = issue(gw, tier="app", owner="other-fleet")
    assert call(url, "POST", {"text_input": "sibling", "max_tokens": 1}, sibling)[0] == 200


def _unknown_key() -> str:
    from proxy.keys.format import generate_key
    return generate_key()[1]


# ------------------------------------------------------------------ classification + policy

ADMIN_ROUTES = [
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", "/v2/repository/models/deepseek/unload", b"{}"),
    ("POST", "/v2/repository/models/deepseek/load", b"{}"),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/r1/unregister", b""),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("GET", "/v2/trace/setting", None),
    ("GET", "/v2/models/deepseek/trace/setting", None),
    ("GET", "/v2/logging", None),
    ("GET", "/v2/models/stats", None),
    ("GET", "/admin/v1/keys", None),
]


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES)
def test_user_key_gets_403_on_admin_routes_and_triton_sees_nothing(
        gw: Gateway, relay: TcpRelay, user_key: str, method: str, path: str, body: bytes | None) -> None:
    relay.clear()
    status, _, raw = call(gw.url + path, method, body, user_key)
    assert status == 403 and json.loads(raw) == {"error": "forbidden by policy"}
    assert path.encode() not in relay.seen()


# Safe admin routes (no state change) must work for an admin key end to end.
@pytest.mark.parametrize("method, path", [
    ("POST", "/v2/repository/index"), ("GET", "/v2/systemsharedmemory/status"),
    ("GET", "/v2/cudasharedmemory/status"), ("GET", "/v2/trace/setting"), ("GET", "/v2/logging"),
    ("GET", "/v2/models/stats"), ("GET", "/admin/v1/keys"),
])
def test_admin_key_gets_200_on_admin_routes(gw: Gateway, admin_key: str, method: str, path: str) -> None:
    status, _, raw = call(gw.url + path, method, b"{}" if method == "POST" else None, admin_key)
    assert status == 200, raw


def test_user_may_read_config_and_own_stats(gw: Gateway, user_key: str) -> None:
    assert call(gw.url + "/v2/models/deepseek/config", key=user_key)[0] == 200
    assert call(gw.url + "/v2/models/deepseek/stats", key=user_key)[0] == 200
    assert call(gw.url + "/v2", key=user_key)[0] == 200


def test_shared_memory_in_infer_body_is_refused_for_users(gw: Gateway, relay: TcpRelay, user_key: str) -> None:
    body = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES",
                        "parameters": {"shared_memory_region": "stolen-xyz", "shared_memory_byte_size": 64}}]}
    relay.clear()
    status, _, _ = call(gw.url + "/v2/models/deepseek/infer", "POST", body, user_key)
    assert status == 403 and b"stolen-xyz" not in relay.seen()


@pytest.mark.parametrize("path", [
    "/v2/models/../repository/index", "/v2/models/%2e%2e/repository/index", "/v2/models/deep%2fseek/infer",
    "/v2//models/deepseek", "/v2/models/./deepseek", "/v2/models/deep%00seek", "/v2/models/deepseek/",
    "/v2/models/deep%5cseek", "/v2/models/" + "a" * 200,
])
def test_400_for_path_tricks_and_triton_sees_nothing(gw: Gateway, relay: TcpRelay, admin_key: str,
                                                     path: str) -> None:
    relay.clear()
    status, _, _ = call(gw.url + path, "POST" if "index" in path else "GET", None, admin_key)
    assert status == 400
    assert path.encode() not in relay.seen()


def test_policy_hot_reload_and_broken_edit(gw: Gateway, user_key: str) -> None:
    url = gw.url + "/v2/models/deepseek"
    extra = gw.policy_dir / "zz-test.yaml"
    assert call(url, key=user_key)[0] == 200
    try:
        extra.write_text("rules:\n  - id: block-alice\n    effect: deny\n    subject: {owners: [alice]}\n"
                         "    resources: ['model:deepseek']\n    actions: ['*']\n")
        assert wait_for(lambda: call(url, key=user_key)[0] == 403, 2.0)
        errors_before = metric(gw, "seekgate_policy_reload_errors_total")
        extra.write_text("rules:\n  - id: block-alice\n    effect: alow\n")
        assert wait_for(lambda: metric(gw, "seekgate_policy_reload_errors_total") > errors_before, 2.0)
        assert call(url, key=user_key)[0] == 403   # last good policy still in force
    finally:
        extra.unlink()
    assert wait_for(lambda: call(url, key=user_key)[0] == 200, 2.0)


# ------------------------------------------------------------------ audit + metrics


def audit_for(gw: Gateway, request_id: str) -> list[dict[str, Any]]:
    wait_for(lambda: any(r["request_id"] == request_id for r in audit_records(gw)), 3.0)
    return [r for r in audit_records(gw) if r["request_id"] == request_id]


def test_audit_one_record_per_request_with_token_counts(gw: Gateway, user_key: str) -> None:
    _, h1, raw = call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": "count me", "max_tokens": 7},
                      user_key)
    _, h2, stream = call(gw.url + "/v2/models/deepseek_stream/generate_stream", "POST",
                         {"text_input": "count me", "max_tokens": 6}, user_key)
    _, h3, _ = call(gw.url + "/v2/logging", key=user_key)
    _, h4, _ = call(gw.url + "/v2/models/deepseek")
    (gen,) = audit_for(gw, h1["X-Request-Id"])
    assert gen["status"] == "allowed" and gen["http_status"] == 200 and gen["actor"] == "alice"
    assert gen["input_tokens"] == json.loads(raw)["input_tokens"] and gen["output_tokens"] == 7
    assert gen["resource"] == "model:deepseek" and gen["action"] == "infer" and gen["upstream_ms"] > 0
    (st,) = audit_for(gw, h2["X-Request-Id"])
    assert st["output_tokens"] == 6 and st["model"] == "deepseek_stream"
    (denied,) = audit_for(gw, h3["X-Request-Id"])
    assert denied["status"] == "denied" and denied["http_status"] == 403 and denied["rule"]
    (anon,) = audit_for(gw, h4["X-Request-Id"])
    assert anon["status"] == "denied" and anon["http_status"] == 401 and anon["reason"] == "missing_credentials"
    for rec in (gen, st, denied, anon):
        assert set(rec) >= {"timestamp", "event_id", "request_id", "actor", "key_id", "tier", "action", "resource",
                            "model", "status", "http_status", "reason", "client_ip", "duration_ms", "upstream_ms",
                            "input_tokens", "output_tokens"}


def test_metrics_count_a_known_sequence(gw: Gateway, user_key: str) -> None:
    labels = {"model": "deepseek", "action": "infer", "tier": "user", "status": "allowed", "protocol": "http"}
    before = metric(gw, "seekgate_requests_total", **labels)
    tokens_before = metric(gw, "seekgate_tokens_total", model="deepseek", direction="output")
    auth_before = metric(gw, "seekgate_auth_failures_total", reason="missing_credentials")
    for _ in range(3):
        call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": "m", "max_tokens": 4}, user_key)
    call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": "m", "max_tokens": 4})
    call(gw.url + "/v2/models/" + "random-model-abc" + "/generate", "POST", {"text_input": "m"}, user_key)
    assert wait_for(lambda: metric(gw, "seekgate_requests_total", **labels) == before + 3, 2.0)
    assert metric(gw, "seekgate_tokens_total", model="deepseek", direction="output") == tokens_before + 12
    assert metric(gw, "seekgate_auth_failures_total", reason="missing_credentials") == auth_before + 1
    assert metric(gw, "seekgate_upstream_up") == 1
    text = urllib.request.urlopen(gw.metrics_url).read().decode()
    assert "random-model-abc" not in text and "seekgate_request_duration_seconds_bucket" in text


def test_triton_down_gives_503_then_recovers(gw: Gateway, relay: TcpRelay, user_key: str) -> None:
    url = gw.url + "/v2/models/deepseek/generate"
    body = {"text_input": "are you there", "max_tokens": 2}
    relay.block()
    try:
        status, headers, raw = call(url, "POST", body, user_key)
        assert status == 503 and headers.get("Retry-After") and json.loads(raw)["error"]
        # Readiness is Triton's: a load balancer takes this proxy out while Triton is away.
        assert call(gw.url + "/v2/health/ready")[0] == 503
    finally:
        relay.block(False)
    # Back within seconds of Triton's return, without a restart.
    assert wait_for(lambda: call(url, "POST", body, user_key)[0] == 200, 5.0)
    assert call(gw.url + "/v2/health/ready")[0] == 200


def test_zz_no_plaintext_key_anywhere_on_disk_in_logs_or_metrics(gw: Gateway, triton: TritonProcess,
                                                                  user_key: str, admin_key: str) -> None:
    assert len(ISSUED) >= 2 and LOGS.lines
    files = [*gw.root.rglob("*"), *triton.launch.data_dir.rglob("*")]
    blobs = [p.read_bytes() for p in files if p.is_file()]
    blobs.append(urllib.request.urlopen(gw.metrics_url).read())
    blobs.append("\n".join(LOGS.lines).encode())
    for token in ISSUED:
        assert not any(token.encode() in blob for blob in blobs)


def test_admin_api_issues_a_working_key_and_revokes_it(gw: Gateway, admin_key: str, user_key: str) -> None:
    status, headers, raw = call(gw.url + "/admin/v1/keys", "POST",
                                {"tier": "user", "owner": "dave", "roles": ["user"], "expires": "1d"}, admin_key)
    assert status == 201, raw
    created = json.loads(raw)
    ISSUED.append(created["key"])
    assert call(gw.url + "/v2/models/deepseek", key=created["key"])[0] == 200
    status, _, listing = call(gw.url + "/admin/v1/keys", key=admin_key)
    assert status == 200 and created["key"].encode() not in listing and created["key_id"].encode() in listing
    assert call(gw.url + f"/admin/v1/keys/{created['key_id']}/revoke", "POST", b"", admin_key)[0] == 200
    assert call(gw.url + "/v2/models/deepseek", key=created["key"])[0] == 401
    assert call(gw.url + "/admin/v1/keys", "POST", {"tier": "user", "owner": "x"}, user_key)[0] == 403


def test_body_over_the_cap_is_413_declared_or_chunked(gw: Gateway, relay: TcpRelay, user_key: str) -> None:
    big = b'{"text_input": "' + b"x" * BODY_CAP + b'"}'
    relay.clear()
    assert call(gw.url + "/v2/models/deepseek/generate", "POST", big, user_key)[0] == 413
    sock = socket.create_connection(("127.0.0.1", gw.settings.server.http_port), timeout=30)
    sock.sendall(b"POST /v2/models/deepseek/generate HTTP/1.1\r\nHost: seekgate\r\n"
                 + f"Authorization: Bearer {user_key}\r\n".encode() + b"Transfer-Encoding: chunked\r\n\r\n")

    def send_chunks() -> None:
        try:
            for _ in range(BODY_CAP // 65536 + 2):
                sock.sendall(b"10000\r\n" + b"y" * 65536 + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:   # the server may close once it has answered: the status is read below
            pass
    # Read while sending: the answer is in hand before the server's close can reset the connection.
    sender = threading.Thread(target=send_chunks)
    sender.start()
    try:
        status_line = read_until(sock, b"\r\n").split(b"\r\n", 1)[0]
    finally:
        sender.join(30)
        sock.close()
    assert status_line.startswith(b"HTTP/1.1 413 ")
    assert b"xxxxxxxx" not in relay.seen() and b"yyyyyyyy" not in relay.seen()
    # The refused uploads cost nobody else anything.
    assert call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": "after", "max_tokens": 2},
                user_key)[0] == 200


def long_answer_prompt(triton: TritonProcess) -> str:
    """A prompt the tiny random model answers at length (greedy decoding may hit EOS early)."""
    for prompt in ("Hello world", "The quick brown fox", "seekgate", "Banks", "0123", "a b c", "Triton", "xyz"):
        _, _, raw = call(triton.http_url + "/v2/models/deepseek/generate", "POST",
                         {"text_input": prompt, "max_tokens": 200})
        if json.loads(raw)["output_tokens"] >= 100:
            return prompt
    raise AssertionError("no prompt gives a long answer with this checkpoint")


def test_sse_events_are_relayed_as_they_come_not_buffered(gw: Gateway, triton: TritonProcess,
                                                         user_key: str) -> None:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]), timeout=60)
    body = json.dumps({"text_input": long_answer_prompt(triton), "max_tokens": 200})
    started = time.perf_counter()
    conn.request("POST", "/v2/models/deepseek_stream/generate_stream", body,
                 {"Authorization": f"Bearer {user_key}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    first = response.read1(65536)  # the first chunk, de-chunked
    first_at = time.perf_counter() - started
    rest = response.read()
    total = time.perf_counter() - started
    conn.close()
    assert first.startswith(b"data: ") and rest.count(b"data: ") > 50
    # A buffering proxy would deliver the first event only with the last one.
    assert first_at < total / 2, (first_at, total)


def raw_request(gw: Gateway, method: str, path: str, body: bytes, headers: dict[str, str]) -> socket.socket:
    """A request sent over a plain socket: the test decides when it closes and reads the status itself."""
    sock = socket.create_connection(("127.0.0.1", gw.settings.server.http_port), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "seekgate", "Content-Length": str(len(body)),
                                                   **headers}.items())
    sock.sendall(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        data = sock.recv(65536)
        assert data, f"connection closed before {marker!r}: {got[:200]!r}"
        got += data
    return got


def leave_mid_answer(relay: TcpRelay, marker: str, send: Callable[[], socket.socket],
                     answering: Callable[[socket.socket], object]) -> None:
    """Sends a request (carrying `marker`) whose later events Triton's side of `relay` holds back,
    waits until `answering` says the answer is under way, closes the client's socket, and waits
    for seekgate to close Triton's connection: the cancel reaching Triton, not a deadline (held
    upstream, Triton's request would otherwise never end; the bound only limits how long a
    failure takes to show)."""
    relay.hold_after(b"data:")
    try:
        sock = send()
        answering(sock)
        upstream = relay.connection_carrying(marker.encode())
        assert upstream is not None and not upstream.closed.is_set()
        sock.close()
        assert upstream.closed.wait(60), "Triton's request outlived its client"
    finally:
        relay.let_flow()


def leave_while_held(relay: TcpRelay, marker: str, send: Callable[[], socket.socket],
                     audited: Callable[[], bool]) -> None:
    """Sends a request (carrying `marker`) that the relay keeps from Triton, closes the client's socket
    while it waits there, and checks `audited` comes true before the hold ends: seekgate watched its
    client while it waited for Triton's headers, and dropped the request when the client went."""
    hold = relay.hold_requests(marker.encode())
    try:
        sock = send()
        assert hold.held.wait(30), "the request never reached the relay"
        sock.close()
        assert wait_for(audited, 15.0), "the request outlived its client while Triton had not answered"
    finally:
        hold.release()


def streaming_200(sock: socket.socket) -> None:
    """leave_mid_answer's `answering` for a stream: a 200 and its first event reached the client."""
    assert read_until(sock, b"data:").startswith(b"HTTP/1.1 200")


def test_client_dropping_a_stream_cancels_the_upstream_request(gw: Gateway, relay: TcpRelay) -> None:
    key_id, key = issue(gw, owner="dropper")
    marker = f"drop-{uuid.uuid4().hex}"
    # Triton's next events wait in the relay: seekgate has nothing to write, so only watching the
    # client's connection can tell it the client left.
    leave_mid_answer(relay, marker,
                     lambda: raw_request(gw, "POST", "/v2/models/deepseek_stream/generate_stream",
                                         json.dumps({"text_input": marker, "max_tokens": 200}).encode(), bearer(key)),
                     streaming_200)
    assert wait_for(lambda: any(r["key_id"] == key_id for r in audit_records(gw)), 30.0)
    (rec,) = [r for r in audit_records(gw) if r["key_id"] == key_id]
    assert rec["status"] == "error" and rec["reason"] == "client_disconnected" and rec["http_status"] == 499
    assert rec["output_tokens"] >= 1


def test_client_leaving_before_tritons_headers_is_499_at_once(gw: Gateway, relay: TcpRelay) -> None:
    key_id, key = issue(gw, owner="early-dropper")
    marker = f"early-drop-{uuid.uuid4().hex}"
    leave_while_held(relay, marker,
                     lambda: raw_request(gw, "POST", "/v2/models/deepseek_stream/generate_stream",
                                         json.dumps({"text_input": marker, "max_tokens": 200}).encode(), bearer(key)),
                     lambda: any(r["key_id"] == key_id for r in audit_records(gw)))
    time.sleep(0.5)   # released: nothing more comes of it
    (rec,) = [r for r in audit_records(gw) if r["key_id"] == key_id]
    assert (rec["status"], rec["reason"], rec["http_status"]) == ("error", "client_disconnected", 499)


def test_tritonclient_with_a_base_path(triton: TritonProcess, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, triton.http_url, free_ports(3), **{"server.base_path": "/triton"}).start()
    try:
        _, key = gw.key(owner="erin")
        client = httpclient.InferenceServerClient(gw.url.removeprefix("http://") + "/triton")
        result = client.infer("deepseek", infer_inputs(httpclient, "base path", 3, True), headers=bearer(key))
        assert result.as_numpy("output_tokens")[0, 0] == 3
        assert call(gw.url + "/v2/models/deepseek", key=key)[0] == 404
    finally:
        gw.stop()


def test_slow_triton_gives_504(triton: TritonProcess, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, triton.http_url, free_ports(3), **{"upstream.request_timeout_s": 0.05}).start()
    try:
        _, key = gw.key(owner="frank")
        status, _, raw = call(gw.url + "/v2/models/deepseek/generate", "POST",
                              {"text_input": "take your time", "max_tokens": 200}, key)
        assert status == 504 and json.loads(raw) == {"error": "inference server timed out"}
    finally:
        gw.stop()


# ------------------------------------------------------------------ ordering

def test_the_answer_leaves_before_the_audit_and_metrics_step(gw: Gateway,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """finish() (audit record, metrics) runs only once the client holds its answer, refusals included."""
    import threading

    from proxy.frontend import http as http_server
    allowed_id, allowed = issue(gw, owner="order-probe", roles=("user",))
    denied_id, denied = issue(gw, owner="order-probe-other", models=("not-deepseek",))   # 403: other model
    real_finish = http_server.finish
    # One event per request: with a shared one cleared between requests, a first finish() that
    # ran late would wait for the second answer, which its own blocking holds back.
    received = {allowed_id: threading.Event(), denied_id: threading.Event()}
    seen_by_finish: list[bool] = []

    def finish_once_answered(state: Any, ctx: Any) -> None:
        # Blocks the gateway's loop until the test thread has the whole answer (bounded): were the
        # answer sent after finish(), it could not arrive while this waits. Other requests (a
        # previous test's late finish) pass straight through.
        if ctx.principal is not None and ctx.principal.key_id in received:
            seen_by_finish.append(received[ctx.principal.key_id].wait(20))   # generous: CI machines are slow
        real_finish(state, ctx)

    monkeypatch.setattr(http_server, "finish", finish_once_answered)
    for key_id, key, want in ((allowed_id, allowed, 200), (denied_id, denied, 403)):
        status, _, body = call(gw.url + "/v2/models/deepseek/generate", "POST",
                               {"text_input": "order", "max_tokens": 2}, key=key)
        received[key_id].set()
        assert status == want and body
    assert wait_for(lambda: len(seen_by_finish) == 2, 20.0) and seen_by_finish == [True, True]


def test_a_served_process_freezes_its_start_up_heap_and_an_embedded_server_does_not(tmp_path: Path) -> None:
    import gc
    before = gc.get_freeze_count()
    dead_upstream = f"http://127.0.0.1:{free_ports(1)[0]}"   # the server starts whatever Triton's state
    embedded = Gateway(tmp_path / "embedded", dead_upstream, free_ports(3)).start()
    try:
        assert gc.get_freeze_count() == before   # pytest's heap is not the server's to freeze
    finally:
        embedded.stop()
    served = Gateway(tmp_path / "served", dead_upstream, free_ports(3), freeze_heap=True).start()
    try:
        # What start-up built (the app, the policy, the store's state) is out of the collector's
        # walks; what requests allocate is still collected.
        assert gc.get_freeze_count() > before + 10_000
        with urllib.request.urlopen(served.metrics_url) as answer:   # seekgate's own, Triton or not
            assert answer.status == 200
        garbage = [object()]
        garbage.append(garbage)   # a cycle made after the freeze
        del garbage
        assert gc.collect() >= 1
    finally:
        served.stop()
        gc.unfreeze()


def test_deep_nesting_with_a_lone_surrogate_is_an_audited_400_at_every_depth(gw: Gateway, user_key: str) -> None:
    """The surrogate walk once recursed past the limit at depths the decoder took: aiohttp's bare 500,
    no request id, an "allowed" audit record."""
    ids = []
    for depth in range(940, 1000):
        body = ('{"text_input": "hi", "p": ' + "[" * depth + '"\\ud800"' + "]" * depth + "}").encode()
        status, headers, raw = call(gw.url + "/v2/models/deepseek/generate", "POST", body, user_key)
        assert status == 400 and json.loads(raw)["error"], (depth, raw[:80])
        ids.append(headers["X-Request-Id"])
    assert wait_for(lambda: set(ids) <= {r["request_id"] for r in audit_records(gw)}, 5.0)
    mine = [r for r in audit_records(gw) if r["request_id"] in set(ids)]
    assert all(r["status"] == "denied" and r["http_status"] == 400 for r in mine)


def test_an_unexpected_exception_is_an_audited_500_with_the_request_id(
        gw: Gateway, user_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.frontend import http as http_server

    async def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug in a step")
    monkeypatch.setattr(http_server, "check_body", broken)
    status, headers, raw = call(gw.url + "/v2/models/deepseek/generate", "POST",
                                {"text_input": "hi", "max_tokens": 2}, user_key)
    assert status == 500 and json.loads(raw) == {"error": "internal error"}
    rid = headers["X-Request-Id"]
    assert wait_for(lambda: any(r["request_id"] == rid for r in audit_records(gw)), 5.0)
    rec = next(r for r in audit_records(gw) if r["request_id"] == rid)
    assert (rec["status"], rec["http_status"], rec["reason"]) == ("error", 500, "internal_error: RuntimeError")


def test_a_streams_generation_is_upstream_time_not_seekgates_overhead(gw: Gateway, relay: TcpRelay,
                                                                     user_key: str) -> None:
    """Triton's events after the first are held for 1 s: that second is Triton's (upstream_ms,
    seekgate_upstream_duration_seconds), not seekgate_overhead_seconds; it was, as upstream time ended
    at Triton's response headers."""
    overhead = metric(gw, "seekgate_overhead_seconds_sum", protocol="http")
    relay.hold_after(b"data:")
    threading.Timer(1.0, relay.let_flow).start()
    _, headers, _ = call(gw.url + "/v2/models/deepseek_stream/generate_stream", "POST",
                         {"text_input": "timed", "max_tokens": 6}, user_key)
    assert wait_for(lambda: len(audit_for(gw, headers["X-Request-Id"])) == 1, 5.0)
    (rec,) = audit_for(gw, headers["X-Request-Id"])
    assert rec["upstream_ms"] >= 800 and rec["duration_ms"] - rec["upstream_ms"] < 500
    assert wait_for(lambda: metric(gw, "seekgate_overhead_seconds_sum", protocol="http") > overhead, 5.0)
    assert metric(gw, "seekgate_overhead_seconds_sum", protocol="http") - overhead < 0.5
