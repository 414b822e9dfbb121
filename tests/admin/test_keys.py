"""The /admin/v1/keys API, driven through a tiny aiohttp app with a real SqliteStore."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.admin.keys import handle_admin
from proxy.audit.writer import build_record
from proxy.context import RequestContext
from proxy.local.triton import TritonProcess, free_ports
from proxy.settings import ServerSettings, Settings
from proxy.steps.app_state import CTX, STATE, AppState
from proxy.steps.authn import authenticate
from proxy.store import KeyRecord
from proxy.store.sqlite import SqliteStore
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, wait_for

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
    extra = SEEN[-1].extra
    assert (extra["admin_action"], extra["admin_target"], extra["admin_before"]) == ("keys.create", made["key_id"], {})
    assert extra["admin_after"] == {made["key_id"]: {k: v for k, v in made.items() if k not in ("key", "key_id")}}
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
    extra = SEEN[-1].extra
    assert (extra["admin_action"], extra["admin_target"]) == ("keys.revoke", app_key["key_id"])
    assert extra["admin_detail"] == "2 newly revoked of 2 key(s)"
    # Who: the caller's key in the record; what: the action; before/after: both keys' public views.
    assert {k: v["status"] for k, v in extra["admin_before"].items()} == \
        {app_key["key_id"]: "active", device["key_id"]: "active"}
    assert {k: v["status"] for k, v in extra["admin_after"].items()} == \
        {app_key["key_id"]: "revoked", device["key_id"]: "revoked"}
    audited = json.dumps(build_record(SEEN[-1]))
    for made in (app_key, device):
        stored = await client.app[STATE].store.get_key(made["key_id"])
        assert made["key"] not in audited and stored is not None and stored.secret_hash not in audited
    shown = await (await client.get(f"/admin/v1/keys/{device['key_id']}")).json()
    assert shown["status"] == "revoked" and shown["revoked_at"].endswith("Z")
    resp = await client.delete(f"/admin/v1/keys/{device['key_id']}")
    assert (resp.status, await resp.json()) == (200, {"revoked": 0})
    user = await create(client)
    resp = await client.delete(f"/admin/v1/keys/{user['key_id']}")
    assert (resp.status, await resp.json()) == (200, {"revoked": 1})


def stored(key_id: str, expires_at: float | None = None) -> KeyRecord:
    return KeyRecord(key_id=key_id, secret_hash="ab" * 32, tier="user", owner=f"o-{key_id}",
                     created_at=time.time(), expires_at=expires_at)


async def walk(client: Client, path: str) -> tuple[list[list[str]], list[str | None]]:
    """Every page from `path` on, following `next`: the key ids of each page, and each page's `next`."""
    pages: list[list[str]] = []
    links: list[str | None] = []
    next_path: str | None = path
    while next_path is not None:
        resp = await client.get(next_path)
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
        assert set(doc) == {"keys", "next"}
        pages.append([k["id"] for k in doc["keys"]])
        links.append(next_path := doc["next"])
    return pages, links


async def test_list_pages_by_key_id_and_next_walks_every_key_once(client: Client) -> None:
    store = client.app[STATE].store
    ids = sorted(f"{c}{'a' * 11}" for c in "mbzhcq2")
    for key_id in ids:
        await store.create_key(stored(key_id))
    pages, links = await walk(client, "/admin/v1/keys?size=3")
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    assert links[-1] is None and all(link is not None and link.startswith("/admin/v1/keys?size=3&offset=")
                                     for link in links[:-1])
    # Exactly a page left: the last page is full and says so (no empty page after it).
    assert (await walk(client, "/admin/v1/keys?size=7"))[0] == [ids]
    assert SEEN[-1].extra["admin_action"] == "keys.list"


async def test_list_default_size_is_100_and_at_most_1000(client: Client) -> None:
    store = client.app[STATE].store
    ids = sorted(f"{n:03d}".translate(str.maketrans("0123456789", "abcdefghij")) + "z" * 9 for n in range(101))
    for key_id in ids:
        await store.create_key(stored(key_id))
    first = await (await client.get("/admin/v1/keys")).json()
    assert [k["id"] for k in first["keys"]] == ids[:100] and first["next"] is not None
    assert [k["id"] for k in (await (await client.get(first["next"])).json())["keys"]] == ids[100:]
    whole = await (await client.get("/admin/v1/keys", params={"size": "1000"})).json()
    assert len(whole["keys"]) == 101 and whole["next"] is None


async def test_expiring_filter_pages_and_next_keeps_it(client: Client) -> None:
    store = client.app[STATE].store
    soon = time.time() + 3600
    due = sorted(f"{c}{'e' * 11}" for c in "kdxa")
    for key_id in due:
        await store.create_key(stored(key_id, soon))
    await store.create_key(stored("bbbbbbbbbbbb", soon + 30 * 86400))
    await store.create_key(stored("cccccccccccc"))
    pages, links = await walk(client, "/admin/v1/keys?expiring=72h&size=3")
    assert pages == [due[:3], due[3:]]
    assert links[0] is not None and "expiring=72h" in links[0]


@pytest.mark.parametrize("query, message", [
    ("size=0", "size must be a whole number from 1 to 1000, got '0'"),
    ("size=1001", "size must be a whole number from 1 to 1000, got '1001'"),
    ("size=10000000000000000000000", "size must be a whole number from 1 to 1000"),
    ("size=-1", "size must be a whole number from 1 to 1000, got '-1'"),
    ("size=%2B5", "size must be a whole number from 1 to 1000, got '+5'"),
    ("size=", "size must be a whole number from 1 to 1000, got ''"),
    ("size=ten", "size must be a whole number from 1 to 1000, got 'ten'"),
    ("offset=", "offset is not a cursor from this API"),
    ("offset=aaaaaaaaaaaa", "offset is not a cursor from this API"),
    ("offset=%FF%FE", "offset is not a cursor from this API"),
    # Well-formed base64 of something that is no cursor ("k1:NOT-A-KEY-ID", "x1:aaaaaaaaaaaa"); and a
    # real cursor ("k1:aaaaaaaaaaaa") with a character base64 would skip.
    ("offset=azE6Tk9ULUEtS0VZLUlE", "offset is not a cursor from this API"),
    ("offset=eDE6YWFhYWFhYWFhYWFh", "offset is not a cursor from this API"),
    ("offset=azE6YWFhYW!FhYWFhYWFh", "offset is not a cursor from this API"),
    # The listing filters by nothing but `expiring`: a filter it ignored answered every key, which a script
    # asking for alice's keys (to revoke them, say) would have taken for hers.
    ("owner=alice", "unknown parameter(s): owner (known: expiring, offset, size)"),
    ("size=3&status=revoked&tier=app", "unknown parameter(s): status, tier (known: expiring, offset, size)"),
])
async def test_bad_size_or_offset_is_400_and_says_which(client: Client, query: str, message: str) -> None:
    resp = await client.get("/admin/v1/keys?" + query)
    assert resp.status == 400
    doc = await resp.json()
    assert set(doc) == {"error"} and doc["error"].startswith(message)


async def test_a_cursor_resumes_after_its_key_so_a_key_added_meanwhile_is_not_lost(client: Client) -> None:
    store = client.app[STATE].store
    for key_id in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"):
        await store.create_key(stored(key_id))
    first = await (await client.get("/admin/v1/keys?size=1")).json()
    await store.create_key(stored("abbbbbbbbbbb"))   # sorts after the cursor: the next page has it
    second = await (await client.get(first["next"])).json()
    assert [k["id"] for k in second["keys"]] == ["abbbbbbbbbbb"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/admin/v1/keys/aaaaaaaaaaaa"), ("DELETE", "/admin/v1/keys/aaaaaaaaaaaa"),
    ("POST", "/admin/v1/keys/aaaaaaaaaaaa/revoke"), ("GET", "/admin/v1/keys/not-a-key-id"),
    ("GET", "/admin/v1/keys/aaaaaaaaaaaa/sessions"), ("GET", "/admin/v1/keys/not-a-key-id/sessions"),
    ("GET", "/admin/v1/keys/aaaaaaaaaaaa/other"), ("GET", "/admin/v2/keys"),
    ("POST", "/admin/v1/sessions"), ("POST", f"/admin/v1/sessions/{'a' * 32}"),
    ("POST", f"/admin/v1/sessions/{'a' * 32}/other"), ("POST", "/admin/v1/sessions/not-a-jti/revoke"),
    ("POST", f"/admin/v1/sessions/{'A' * 32}/revoke"), ("GET", "/admin/v1/other"),
])
async def test_unknown_is_404(client: Client, method: str, path: str) -> None:
    resp = await client.request(method, path)
    assert resp.status == 404
    assert set(await resp.json()) == {"error"}


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/admin/v1/keys", "GET, POST"), ("DELETE", "/admin/v1/keys", "GET, POST"),
    ("POST", "/admin/v1/keys/aaaaaaaaaaaa", "GET, DELETE"),
    ("GET", "/admin/v1/keys/aaaaaaaaaaaa/revoke", "POST"),
    ("POST", "/admin/v1/keys/aaaaaaaaaaaa/sessions", "GET"),
    ("GET", f"/admin/v1/sessions/{'a' * 32}/revoke", "POST"),
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
    assert [k["id"] for k in listed["keys"]] == [made["key_id"]] and listed["next"] is None
    await client.post("/triton/admin/v1/keys", json={"tier": "app", "owner": "svc2"})
    first = await (await client.get("/triton/admin/v1/keys?size=1")).json()
    assert first["next"].startswith("/triton/admin/v1/keys?size=1&offset=")   # the link works as it is
    assert len((await (await client.get(first["next"])).json())["keys"]) == 1


async def test_session_revoke_is_idempotent_and_audited(client: Client) -> None:
    from proxy.store.sqlite_secrets import SqliteSecretRows
    jti = "0123456789abcdef" * 2
    resp = await client.post(f"/admin/v1/sessions/{jti}/revoke")
    assert (resp.status, await resp.json()) == (200, {"jti": jti, "revoked": 1})
    extra = SEEN[-1].extra
    assert (extra["admin_action"], extra["admin_target"]) == ("sessions.revoke", jti)
    assert (extra["admin_before"], extra["admin_after"]) == ({jti: {"revoked": False}}, {jti: {"revoked": True}})
    assert await (await SqliteSecretRows.open(client.app[STATE].store)).session_revoked(jti)
    resp = await client.post(f"/admin/v1/sessions/{jti}/revoke")
    assert (resp.status, await resp.json()) == (200, {"jti": jti, "revoked": 0})
    assert SEEN[-1].extra["admin_before"] == {jti: {"revoked": True}}
    assert SEEN[-1].extra["admin_detail"] == "already revoked"
    resp = await client.post(f"/admin/v1/sessions/{jti}/revoke", json={"compromised": True})
    assert resp.status == 400 and "no body" in (await resp.json())["error"]
    assert (await client.post(f"/admin/v1/sessions/{jti}/revoke", json={})).status == 200


# ---------------------------------------------------------------- through the real server

@pytest.fixture(scope="module")
def gw(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-admin"), triton.http_url, free_ports(3)).start()
    yield g
    g.stop()


async def test_an_admin_revokes_a_session_and_its_next_request_is_refused(gw: Gateway) -> None:
    # Blocking calls (urllib, gw.key's own event loop) run in a thread; the gateway has its own loop.
    await asyncio.to_thread(_session_revoked_through_the_proxy, gw)


def _session_revoked_through_the_proxy(gw: Gateway) -> None:
    admin_id, admin = gw.key(owner="ops", roles=("admin",))
    _, user = gw.key(owner="alice", roles=("user",))
    minted, other = (json.loads(call(gw.url + "/v1/sessions", "POST", b"", key=user)[2]) for _ in range(2))
    generate = gw.url + "/v2/models/deepseek/generate"
    body = {"text_input": "hi", "max_tokens": 2}
    assert call(generate, "POST", body, minted["token"])[0] == 200   # verified, and cached
    revoke = f"{gw.url}/admin/v1/sessions/{minted['jti']}/revoke"
    assert call(revoke, "POST", b"", user)[0] == 403                  # admin only, like every admin route
    assert call(revoke, "POST", b"", minted["token"])[0] == 403
    status, _, raw = call(revoke, "POST", b"", admin)
    assert (status, json.loads(raw)) == (200, {"jti": minted["jti"], "revoked": 1})
    assert call(generate, "POST", body, minted["token"])[0] == 401   # the very next request
    assert call(generate, "POST", body, other["token"])[0] == 200    # the user's other session is untouched
    assert call(revoke, "POST", b"", admin)[0] == 200                 # idempotent
    # The refusals (403) are audited too, but as policy denials: they never reached the admin API.
    def done() -> list[dict[str, Any]]:
        return [r for r in audit_records(gw) if r.get("admin", {}).get("action") == "sessions.revoke"]
    assert wait_for(lambda: len(done()) == 2, 10), audit_records(gw)
    denied = [r for r in audit_records(gw) if r["path"] == f"/admin/v1/sessions/{minted['jti']}/revoke"
              and r["http_status"] == 403]
    assert len(denied) == 2 and {r["status"] for r in denied} == {"denied"}
    first, again = done()
    assert [(r["key_id"], r["actor"], r["admin"]["target"]) for r in (first, again)] == \
        [(admin_id, "ops", minted["jti"])] * 2
    assert (first["admin"]["before"], first["admin"]["after"]) == \
        ({minted["jti"]: {"revoked": False}}, {minted["jti"]: {"revoked": True}})
    assert again["admin"]["before"] == {minted["jti"]: {"revoked": True}}
    assert minted["token"] not in json.dumps(audit_records(gw))
