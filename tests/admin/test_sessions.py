"""Session tokens end to end through seekgate and the real Triton: exchange, use over HTTP and gRPC, refusals."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tritonclient.utils import InferenceServerException

from proxy.cli.main import main
from proxy.keys.secrets_setup import open_envelope
from proxy.keys.sessions import load_signing_keys
from proxy.local.triton import TritonProcess
from proxy.paths import store_path
from proxy.store.sqlite import SqliteStore
from tests.conftest import free_ports
from tests.frontend.test_http import call
from tests.gateway import Gateway
from tests.relay import TcpRelay
from tests.sessiontokens import attack_tokens


@pytest.fixture(scope="module")
def gw(triton: TritonProcess, grpc_relay: TcpRelay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-sessions"), triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{grpc_relay.port}"}).start()
    yield g
    g.stop()


def exchange(gw: Gateway, key: str) -> tuple[int, dict]:
    status, _, body = call(gw.url + "/v1/sessions", "POST", b"", key=key)
    return status, json.loads(body)


def signing_key(gw: Gateway) -> tuple[str, Ed25519PrivateKey]:
    """The gateway's signing key, recovered the way the gateway does: through the envelope."""
    async def go() -> tuple[str, Ed25519PrivateKey]:
        store = await SqliteStore.open(store_path(gw.data_dir))
        try:
            keys, active = await load_signing_keys((await open_envelope(gw.data_dir, store))[0])
            return active, keys[active]
        finally:
            await store.close()
    return asyncio.run(go())


def unauthenticated_body(gw: Gateway) -> bytes:
    status, _, body = call(gw.url + "/v2/models/deepseek")
    assert status == 401
    return body


def infer_inputs(module, text: str, max_tokens: int) -> list:  # type: ignore[no-untyped-def]
    a = module.InferInput("text_input", [1, 1], "BYTES")
    a.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    b = module.InferInput("max_tokens", [1, 1], "INT32")
    b.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [a, b]


def test_user_key_exchanged_for_a_session_that_infers_over_http_and_grpc(gw: Gateway) -> None:
    parent_id, key = gw.key(owner="alice", roles=("user",))
    before = int(time.time())
    status, minted = exchange(gw, key)
    assert status == 200 and set(minted) == {"token", "expires_at", "jti"}
    assert before + 900 <= minted["expires_at"] <= int(time.time()) + 900
    claims = jwt.decode(minted["token"], options={"verify_signature": False})
    assert claims["parent"] == parent_id and claims["tier"] == "session" and claims["jti"] == minted["jti"]
    headers = {"authorization": f"Bearer {minted['token']}"}   # gRPC metadata keys are lower case
    http = httpclient.InferenceServerClient(gw.url.removeprefix("http://"))
    # A copy each: tritonclient.http adds its own entries to the dict it is given.
    out = http.infer("deepseek", infer_inputs(httpclient, "Hello", 3), headers=dict(headers))
    assert out.as_numpy("output_tokens")[0, 0] == 3
    grpc_ = grpcclient.InferenceServerClient(f"127.0.0.1:{gw.settings.server.grpc_port}")
    out = grpc_.infer("deepseek", infer_inputs(grpcclient, "Hello", 2), headers=dict(headers))
    assert out.as_numpy("output_tokens")[0, 0] == 2
    # Revoking the parent ends the session on the very next request, on both front ends.
    gw.revoke(parent_id)
    assert call(gw.url + "/v2/models/deepseek", key=minted["token"])[0] == 401
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|Unauthenticated|unauthenticated"):
        grpc_.infer("deepseek", infer_inputs(grpcclient, "Hello", 2), headers=dict(headers))


def test_app_keys_mint_while_sessions_and_devices_get_the_same_401(gw: Gateway) -> None:
    expected = unauthenticated_body(gw)
    app_id, app_key = gw.key(tier="app", owner="billing", roles=())
    status, minted = exchange(gw, app_key)
    assert status == 200
    assert call(gw.url + "/v2/models/deepseek", key=minted["token"])[0] == 200
    _, device_key = gw.key(tier="device", owner="edge-1", roles=(), parent_id=app_id)
    for key in (minted["token"], device_key):
        status, _, body = call(gw.url + "/v1/sessions", "POST", b"", key=key)
        assert (status, body) == (401, expected)


def test_every_jwt_attack_is_a_401_with_the_same_body(gw: Gateway) -> None:
    expected = unauthenticated_body(gw)
    _, key = gw.key(owner="mallory", roles=("user",))
    status, minted = exchange(gw, key)
    assert status == 200
    kid, private = signing_key(gw)
    good = jwt.decode(minted["token"], options={"verify_signature": False})
    tokens = attack_tokens(private, kid, good, int(time.time()))
    # An API key where a JWT is expected and the reverse.
    tokens["session dressed as an API key"] = "sgk_" + minted["token"]
    tokens["API key glued to a session"] = minted["token"] + "." + key
    tokens["API key as a JWT header"] = key + "." + minted["token"].split(".", 1)[1]
    for name, token in tokens.items():
        for route, method in (("/v2/models/deepseek", "GET"), ("/v1/sessions", "POST")):
            status, _, body = call(gw.url + route, method, b"" if method == "POST" else None, key=token)
            assert (name, status, body) == (name, 401, expected)
    # The genuine token still works: the refusals above were about the forgeries.
    assert call(gw.url + "/v2/models/deepseek", key=minted["token"])[0] == 200


def test_a_session_revoked_by_jti_with_the_cli_is_refused(gw: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    expected = unauthenticated_body(gw)
    _, key = gw.key(owner="bob", roles=("user",))
    one, two = exchange(gw, key)[1], exchange(gw, key)[1]
    assert main(["--data-dir", str(gw.data_dir), "sessions", "revoke", one["jti"]]) == 0
    assert "revoked session" in capsys.readouterr().out
    assert call(gw.url + "/v2/models/deepseek", key=one["token"])[::2] == (401, expected)
    assert call(gw.url + "/v2/models/deepseek", key=two["token"])[0] == 200
    assert main(["--data-dir", str(gw.data_dir), "sessions", "revoke", "../etc"]) != 0


def test_the_key_store_holds_no_plaintext_signing_key(gw: Gateway) -> None:
    _, private = signing_key(gw)
    raw = private.private_bytes_raw()
    files = list(Path(gw.data_dir).glob("seekgate.db*")) + list(Path(gw.data_dir).rglob("*.jsonl"))
    assert any(f.name.startswith("seekgate.db") for f in files)
    for f in files:
        data = f.read_bytes()
        assert raw not in data and raw.hex().encode() not in data, f
