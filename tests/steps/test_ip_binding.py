"""IP binding through seekgate and the real Triton: app keys bound to client CIDRs, and what is under them.

The client here is always 127.0.0.1, so a key bound to 10.0.0.0/24 is a key used from the
wrong place, and one bound to 127.0.0.1/32 a key used from the right one. Relays on both
upstream connections show that a refused request never reached Triton.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import grpc
import pytest
from tritonclient.grpc import service_pb2_grpc

from proxy.context import Principal
from proxy.keys.sessions import SessionAuthority
from tests.admin.test_sessions import exchange, signing_key, unauthenticated_body
from tests.frontend.test_grpc import infer_request, md, quiet
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, gateway_via, wait_for
from tests.relay import TcpRelay

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def gw(relays: tuple[TcpRelay, TcpRelay], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_via(tmp_path_factory.mktemp("gw-ip-binding"), *relays) as g:
        yield g


@pytest.fixture(scope="module")
def stub(gw: Gateway) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _bound_family(gw: Gateway, cidr: str) -> dict[str, tuple[str, str]]:
    """An app key bound to `cidr`, a device key under it and a session of the app key: name -> (id, credential).

    The session is signed with the gateway's own signing key, as `POST /v1/sessions` would sign it
    for a client inside `cidr` (from 127.0.0.1 a key bound elsewhere cannot mint one here).
    """
    app_id, app_key = gw.key(tier="app", owner=f"svc-{cidr}", roles=(), allowed_cidrs=(cidr,))
    dev_id, dev_key = gw.key(tier="device", owner="edge", roles=(), parent_id=app_id)
    kid, private = signing_key(gw)
    auth = gw.settings.auth
    minted = SessionAuthority({kid: private}, kid, issuer=auth.session_issuer, audience=auth.session_audience,
                              ttl_s=auth.session_ttl_s).mint(Principal(app_id, "app", f"svc-{cidr}"), time.time())
    return {"app": (app_id, app_key), "device": (dev_id, dev_key), "session": (minted.jti, minted.token)}


def _http_generate(gw: Gateway, key: str, marker: str) -> tuple[int, bytes]:
    status, _, body = call(gw.url + "/v2/models/deepseek/generate", "POST",
                           {"text_input": marker, "max_tokens": 2}, key)
    return status, body


def _grpc_infer(stub: service_pb2_grpc.GRPCInferenceServiceStub, key: str, marker: str
                ) -> tuple[grpc.StatusCode, str]:
    try:
        stub.ModelInfer(infer_request("deepseek", marker, 2), metadata=md(key), timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_keys_under_an_app_key_bound_elsewhere_get_the_plain_401_and_reach_nothing(
        gw: Gateway, relays: tuple[TcpRelay, TcpRelay],
        stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    http_relay, grpc_relay = relays
    expected_http = unauthenticated_body(gw)
    expected_grpc = _grpc_infer(stub, "sgk_not_a_key", "probe")
    assert expected_grpc[0] == grpc.StatusCode.UNAUTHENTICATED
    family = _bound_family(gw, "10.0.0.0/24")
    quiet(http_relay)
    quiet(grpc_relay)
    markers = []
    for name, (_, credential) in family.items():
        marker = f"ip-bound-{name}-{secrets.token_hex(4)}"
        markers.append(marker)
        assert (name, *_http_generate(gw, credential, marker)) == (name, 401, expected_http)
        assert (name, *_grpc_infer(stub, credential, marker)) == (name, *expected_grpc)
    seen = http_relay.seen() + grpc_relay.seen()
    assert not [m for m in markers if m.encode() in seen]

    def refusals() -> list[tuple[str, str]]:
        return sorted((r["protocol"], r["path"]) for r in audit_records(gw) if r["reason"] == "ip_not_allowed")
    want = sorted([("grpc", GRPC_INFER), ("http", "/v2/models/deepseek/generate")] * len(family))
    assert wait_for(lambda: refusals() == want, 5.0), refusals()
    # From here a session cannot even be minted with the bound app key.
    status, _, body = call(gw.url + "/v1/sessions", "POST", b"", family["app"][1])
    assert (status, body) == (401, expected_http)


def test_keys_under_an_app_key_bound_to_the_client_are_served_over_http_and_grpc(
        gw: Gateway, relays: tuple[TcpRelay, TcpRelay],
        stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    http_relay, grpc_relay = relays
    family = _bound_family(gw, "127.0.0.1/32")
    status, minted = exchange(gw, family["app"][1])   # minted by the gateway itself this time
    assert status == 200
    family["minted session"] = (minted["jti"], minted["token"])
    for name, (key_id, credential) in family.items():
        marker = f"ip-ok-{name}-{secrets.token_hex(4)}"
        assert (name, _http_generate(gw, credential, marker)[0]) == (name, 200)
        assert (name, _grpc_infer(stub, credential, marker)[0]) == (name, grpc.StatusCode.OK)
        # The relays do see what is served: their silence above meant something.
        assert marker.encode() in http_relay.seen() and marker.encode() in grpc_relay.seen()
        # Its inferences, one per protocol (the app key's session exchange above has a record too).
        assert wait_for(lambda key_id=key_id: sum(r["key_id"] == key_id and r["http_status"] == 200 and r["action"] == "infer"
                                    for r in audit_records(gw)) == 2, 5.0), name
