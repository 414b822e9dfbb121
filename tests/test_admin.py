"""The /admin/v1/keys API, driven through a tiny aiohttp app with a real SqliteStore."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.admin import handle_admin
from proxy.app_state import CTX, STATE, AppState
from proxy.authn import authenticate
from proxy.context import RequestContext
from proxy.settings import ServerSettings, Settings
from proxy.store.sqlite import SqliteStore

# pytest-aiohttp's aiohttp_client lives on the session loop (the fixture loop scope in
# pyproject), so these tests run there too.
pytestmark = pytest.mark.asyncio(loop_scope="session")
PEPPER = b"q" * 32
Client = TestClient  # type: ignore[type-arg]
SEEN: list[RequestContext] = []


async def unreachable(request: web.Request) -> web.Response:
    raise AssertionError("the middleware answers every request")


async def make_app(tmp_path: Path, base_path: str = "", pre_read: bool = False) -> web.Application:
    """Stands in for the pipeline: sets request[CTX], then hands every request to handle_admin."""
    store = await SqliteStore.open(tmp_path / "seekgate.db")
    settings = dataclasses.replace(Settings(), server=ServerSettings(base_path=base_path))
    unused = cast(Any, None)   # authz, audit, metrics, upstream: not touched by the admin API
    state = AppState(settings, tmp_path, store, PEPPER, unused, unused, unused, unused, unused)

    @web.middleware
    async def pipeline(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        ctx = RequestContext(request_id="r", client_ip="127.0.0.1")
        request[CTX] = ctx
        SEEN.append(ctx)
        # The real pipeline reads the body itself (to cap its size) and passes it on.
        return await handle_admin(request, await request.read() if pre_read else None)

    async def close_store(app: web.Application) -> None:
        await store.close()

    app = web.Application(middlewares=[pipeline])
    app[STATE] = state
    app.on_cleanup.append(close_store)
    app.router.add_route("*", "/{tail:.*}", unreachable)
    return app


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Client]:
    SEEN.clear()
    yield await aiohttp_client(await make_app(tmp_path))


async def create(client: Client, **body: Any) -> dict[str, Any]:
    resp = await client.post("/admin/v1/keys", json={"tier": "user", "name": "alice",
                                                     "roles": ["user"], **body})
    assert resp.status == 201, await resp.text()
    assert resp.headers["Cache-Control"] == "no-store"
    return cast(dict[str, Any], await resp.json())


async def test_create_returns_key_once_and_it_authenticates(client: Client) -> None:
    made = await create(client, labels={"team": "nlp"}, models=["deepseek"], expires="30d")
    assert made["key_id"] == made["id"] and made["key"].startswith("sgk_" + made["key_id"])
    assert (made["tier"], made["owner"], made["roles"], made["status"]) == ("user", "alice", ["user"], "active")
    assert made["labels"] == {"team": "nlp"} and made["models"] == ["deepseek"]
    assert "secret_hash" not in made
    assert SEEN[-1].extra == {"admin_action": "keys.create", "admin_target": made["key_id"]}
    state = client.app[STATE]
    principal = await authenticate(made["key"], state.store, PEPPER, "127.0.0.1", 0)
    assert principal.key_id == made["key_id"]


async def test_list_and_show_never_contain_token_or_hash(client: Client) -> None:
    made = await create(client)
    rec = await client.app[STATE].store.get_key(made["key_id"])
    assert rec is not None
    resp = await client.get("/admin/v1/keys")
    assert resp.status == 200
    text = await resp.text()
    assert made["key"] not in text and rec.secret_hash not in text and "secret" not in text
    keys = (await resp.json())["keys"]
    assert [k["id"] for k in keys] == [made["key_id"]]
    assert SEEN[-1].extra["admin_action"] == "keys.list"
    resp = await client.get(f"/admin/v1/keys/{made['key_id']}")
    assert resp.status == 200
    text = await resp.text()
    assert made["key"] not in text and rec.secret_hash not in text
    assert (await resp.json())["last4"] == made["key"][-4:]
    assert SEEN[-1].extra == {"admin_action": "keys.show", "admin_target": made["key_id"]}


async def test_revoke_by_post_and_delete_cascades_to_devices(client: Client) -> None:
    app_key = await create(client, tier="app", name="billing", roles=["svc"], allowed_cidrs=["10.0.0.0/8"])
    device = await create(client, tier="device", name="sensor", roles=[], parent_id=app_key["key_id"])
    assert device["allowed_cidrs"] == ["10.0.0.0/8"] and device["parent_id"] == app_key["key_id"]
    resp = await client.post(f"/admin/v1/keys/{app_key['key_id']}/revoke")
    assert (resp.status, await resp.json()) == (200, {"revoked": 2})
    assert SEEN[-1].extra == {"admin_action": "keys.revoke", "admin_target": app_key["key_id"]}
    shown = await (await client.get(f"/admin/v1/keys/{device['key_id']}")).json()
    assert shown["status"] == "revoked" and shown["revoked_at"].endswith("Z")
    resp = await client.delete(f"/admin/v1/keys/{device['key_id']}")
    assert (resp.status, await resp.json()) == (200, {"revoked": 0})
    user = await create(client)
    resp = await client.delete(f"/admin/v1/keys/{user['key_id']}")
    assert (resp.status, await resp.json()) == (200, {"revoked": 1})


@pytest.mark.parametrize("method, path", [
    ("GET", "/admin/v1/keys/aaaaaaaaaaaa"), ("DELETE", "/admin/v1/keys/aaaaaaaaaaaa"),
    ("POST", "/admin/v1/keys/aaaaaaaaaaaa/revoke"), ("GET", "/admin/v1/keys/not-a-key-id"),
    ("GET", "/admin/v1/keys/aaaaaaaaaaaa/other"), ("GET", "/admin/v2/keys"),
])
async def test_unknown_is_404(client: Client, method: str, path: str) -> None:
    resp = await client.request(method, path)
    assert resp.status == 404
    assert set(await resp.json()) == {"error"}


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/admin/v1/keys", "GET, POST"), ("DELETE", "/admin/v1/keys", "GET, POST"),
    ("POST", "/admin/v1/keys/aaaaaaaaaaaa", "GET, DELETE"),
    ("GET", "/admin/v1/keys/aaaaaaaaaaaa/revoke", "POST"),
])
async def test_wrong_method_is_405(client: Client, method: str, path: str, allow: str) -> None:
    resp = await client.request(method, path)
    assert resp.status == 405 and resp.headers["Allow"] == allow
    assert "error" in await resp.json()


@pytest.mark.parametrize("body, message", [
    (b"{not json", "JSON object"), (b"[1, 2]", "JSON object"), (b"", "body is empty"), (b"{}", "tier is required"),
    (b'{"tier": "user"}', "name is required"),
    (b'{"tier": "user", "name": "a", "owner": "b"}', "not both"),
    (b'{"tier": "user", "name": "a", "role": ["x"]}', "unknown field(s): role"),
    (b'{"tier": "user", "name": "a", "roles": "admin"}', "roles must be a list"),
    (b'{"tier": "user", "name": "a", "labels": {"k": 1}}', "labels must be"),
    (b'{"tier": "user", "name": "a", "expires": 90}', "duration string"),
    (b'{"tier": "user", "name": "a", "expires": "90 days"}', "bad duration"),
    (b'{"tier": "session", "name": "a"}', "session tokens"),
    (b'{"tier": "device", "name": "a"}', "needs a parent"),
    (b'{"tier": "user", "name": "a", "allowed_cidrs": ["300.1.1.1"]}', "bad CIDR"),
    (b'{"tier": "user", "name": "a", "limits": [1]}', "limits must be an object"),
    (b'{"tier": "user", "name": "a", "limits": {"rps": 1}}', "unknown limit 'rps'"),
    (b'{"tier": "user", "name": "a", "limits": {"rpm": -1}}', "limit rpm must be an integer 0 or more"),
])
async def test_bad_create_is_400_and_stores_nothing(client: Client, body: bytes, message: str) -> None:
    resp = await client.post("/admin/v1/keys", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    doc = await resp.json()
    assert set(doc) == {"error"} and message in doc["error"]
    assert await client.app[STATE].store.list_keys() == []


async def test_base_path_and_pre_read_body(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(await make_app(tmp_path, base_path="/triton", pre_read=True))
    resp = await client.post("/triton/admin/v1/keys", json={"tier": "app", "owner": "svc", "expires": "never"})
    assert resp.status == 201
    made = await resp.json()
    assert made["expires_at"] is None and made["owner"] == "svc"
    listed = await (await client.get("/triton/admin/v1/keys")).json()
    assert [k["id"] for k in listed["keys"]] == [made["key_id"]]
