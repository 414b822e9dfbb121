"""Failed sign-ins per client address in a running seekgate (HTTP, gRPC, the console's sign-in): after the
burst, credentials not already verified are refused 429 before the store; verified ones keep working."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from proxy.keys.format import generate_key
from proxy.local.triton import TritonProcess
from tests.conftest import free_ports
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, wait_for

BURST = 3


@pytest.fixture()
def gw(echo_triton: TritonProcess, tmp_path: Path) -> Iterator[Gateway]:
    # One failure back a minute: nothing refills while a test runs. These clients are on loopback, which
    # is not limited by default (a proxy on the host would make every client one address).
    g = Gateway(tmp_path, echo_triton.http_url, free_ports(3), **{
        "auth.sign_in_failure_burst": BURST, "auth.sign_in_failures_per_min": 1, "auth.sign_in_unlimited": ""}).start()
    yield g
    g.stop()


def unknown_key() -> str:
    return generate_key()[1]


def test_after_the_burst_unverified_credentials_get_429_and_verified_ones_still_work(gw: Gateway) -> None:
    url = gw.url + "/v2/models/echo"
    _, used = gw.key(owner="regular")
    assert call(url, key=used)[0] == 200             # seen to succeed
    _, fresh = gw.key(owner="newcomer")               # valid, never used yet; its creation empties the key cache
    assert [call(url, key=unknown_key())[0] for _ in range(BURST)] == [401] * BURST
    status, headers, body = call(url, key=unknown_key())
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60
    assert json.loads(body)["error"] == "too many failed sign-ins from this address"
    # Fail closed: a right key that was not verified before is refused too (the guard cannot tell it
    # from a lucky guess without the store read it exists to spare).
    assert call(url, key=fresh)[0] == 429
    assert call(url, key=used)[0] == 200             # read from the store again, not held up
    assert call(gw.url + "/v2/health/ready")[0] == 200   # public routes need no sign-in
    assert wait_for(lambda: sum(r.get("reason") == "sign_in_failures" for r in audit_records(gw)) == 2, 10.0)
    refused = [r for r in audit_records(gw) if r.get("reason") == "sign_in_failures"]
    assert {(r["http_status"], r["status"], r["client_ip"]) for r in refused} == {(429, "denied", "127.0.0.1")}


def test_grpc_failures_count_and_are_refused_with_resource_exhausted(gw: Gateway) -> None:
    _, used = gw.key(owner="regular-grpc")
    with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelReadyRequest(name="echo")

        def code(key: str) -> grpc.StatusCode:
            try:
                stub.ModelReady(request, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        assert code(used) != grpc.StatusCode.UNAUTHENTICATED
        assert [code(unknown_key()) for _ in range(BURST)] == [grpc.StatusCode.UNAUTHENTICATED] * BURST
        assert code(unknown_key()) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A stream's sign-in is the same one: refused before its first message.
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(iter([service_pb2.ModelInferRequest(model_name="echo_stream")]),
                                       metadata=(("authorization", f"Bearer {unknown_key()}"),), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code(used) != grpc.StatusCode.RESOURCE_EXHAUSTED


def sign_in(gw: Gateway, key: str) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(gw.url + "/console/session", urlencode({"key": key}).encode(), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with NO_REDIRECTS.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


class _Stay(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


NO_REDIRECTS = urllib.request.build_opener(_Stay)


def test_console_sign_in_guesses_count_too_and_the_page_says_when_to_retry(gw: Gateway) -> None:
    """The console's sign-in form takes a key: guesses there are failed sign-ins like any other."""
    _, admin = gw.key(owner="ops", roles=("admin",))
    assert sign_in(gw, admin)[0] == 303
    assert [sign_in(gw, unknown_key())[0] for _ in range(BURST)] == [401] * BURST
    status, headers, page = sign_in(gw, unknown_key())
    assert status == 429 and headers["Content-Type"].startswith("text/html")
    assert f"Try again in {headers['Retry-After']} s." in page
    assert sign_in(gw, admin)[0] == 303   # verified already: still signs in
