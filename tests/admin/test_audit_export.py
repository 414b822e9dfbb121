"""The audit export streamed (admin/audit.py `_export`, audit/search.py `export`) over both real indexes.

A tiny aiohttp app hands /admin/v1/audit to handle_audit, as the request path does, over this data
dir's SQLite index or the shared PostgreSQL one (a real server, a fresh database per test).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import proxy.admin.audit as admin_audit
from proxy.admin.audit import handle_audit
from proxy.audit import pg_index
from proxy.audit.index import AuditIndex
from proxy.audit.search import EXPORT_BATCH, MAX_PAGE, AuditQuery, export, search
from proxy.context import RequestContext
from proxy.frontend.http import send_now
from proxy.settings import Settings
from proxy.steps.app_state import CTX, STATE, AppState
from proxy.store.backend import Store, open_url
from proxy.store.sqlite import SqliteStore

pytestmark = pytest.mark.asyncio(loop_scope="session")
Client = TestClient  # type: ignore[type-arg]
START = 1_800_000_000.0
# Past two batch boundaries, with seven records to a second: ties on ts straddle the boundaries.
COUNT = 2 * EXPORT_BATCH + 500


def records(n: int, first: int = 0, start: float = START) -> list[dict[str, Any]]:
    return [{"timestamp": datetime.fromtimestamp(start + i // 7, timezone.utc).isoformat(),
             "event_id": f"ev{i:030x}", "key_id": "even" * 3 if i % 2 == 0 else "oddk" * 3, "status": "denied",
             "http_status": 403, "reason": "policy_denied", "client_ip": "10.0.0.1"} for i in range(first, first + n)]


@dataclass
class Index:
    """One real audit index: this data dir's SQLite file, or PostgreSQL's audit_events (`store` on it)."""

    kind: str
    data_dir: Path
    store: Store

    @property
    def pool(self) -> Any | None:
        return pg_index.pool_of(self.store)

    async def insert(self, recs: list[dict[str, Any]]) -> None:
        if self.pool is None:
            index = AuditIndex(self.data_dir / "audit" / "audit.db")   # what the writer keeps
            index.insert(recs)
            index.close()
            return
        shared = pg_index.SharedAuditIndex(self.pool, "replica-x")
        shared.start()
        shared.submit(recs)
        await shared.flush()
        await shared.close()

    async def break_it(self) -> None:
        """The index gone from under a reader: a real failure of its next read."""
        if self.pool is None:
            with sqlite3.connect(self.data_dir / "audit" / "audit.db") as db:
                db.execute("DROP TABLE audit")
            return
        conn = await asyncpg.connect(cast(Any, self.store).url)
        try:
            await conn.execute("DROP TABLE audit_events CASCADE")
        finally:
            await conn.close()

    async def in_search_order(self, query: AuditQuery) -> list[str]:
        """The event ids search() pages through for `query`, page by page (nothing is written meanwhile)."""
        ids: list[str] = []
        while True:
            page = AuditQuery(query.equals, query.reason, query.since, query.until, MAX_PAGE, len(ids))
            rows, _ = await search(self.data_dir, page, self.pool)
            ids += [r["event_id"] for r in rows]
            if len(rows) < MAX_PAGE:
                return ids


@pytest.fixture(params=["sqlite", "postgres"])
def pg_or_none(request: pytest.FixtureRequest) -> str | None:
    """A fresh PostgreSQL database's URL, or None for SQLite (pg_url runs its own loop: not from an async fixture)."""
    return cast(str, request.getfixturevalue("pg_url")) if request.param == "postgres" else None


@pytest.fixture
async def index(pg_or_none: str | None, tmp_path: Path) -> AsyncIterator[Index]:
    (tmp_path / "audit").mkdir()
    if pg_or_none is not None:
        store: Store = await open_url(pg_or_none, migrate=True)
    else:
        store = await SqliteStore.open(tmp_path / "seekgate.db")
    built = Index("postgres" if pg_or_none else "sqlite", tmp_path, store)
    await built.insert(records(COUNT))
    yield built
    await store.close()


SEEN: list[RequestContext] = []


async def app_over(index: Index) -> web.Application:
    """Stands in for the request path: sets request[CTX], hands /admin/v1/audit to handle_audit and sends
    its answer with the request path's own send_now (the audit record is written after it)."""
    unused = cast(Any, None)   # authz, audit writer, metrics, upstream: not touched by the audit reads
    state = AppState(Settings(), index.data_dir, index.store, b"q" * 32, unused, unused, unused, unused, unused)

    @web.middleware
    async def pipeline(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        request[CTX] = ctx = RequestContext(request_id="r", client_ip="127.0.0.1")
        SEEN.append(ctx)
        response = await handle_audit(request, ())
        await send_now(request, ctx, response)
        return response

    app = web.Application(middlewares=[pipeline])
    app[STATE] = state
    return app


async def body_chunks(resp: aiohttp.ClientResponse) -> tuple[bytes, int]:
    """The body, and how many HTTP chunks it came in."""
    body, chunks = b"", 0
    async for data, end_of_chunk in resp.content.iter_chunks():
        body += data
        chunks += end_of_chunk
    return body, chunks


async def test_an_export_streams_every_match_in_chunks_in_search_order(aiohttp_client: Any, index: Index) -> None:
    client: Client = await aiohttp_client(await app_over(index))
    resp = await client.get("/admin/v1/audit", params={"format": "jsonl"})
    assert resp.status == 200
    assert resp.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in resp.headers
    assert resp.headers["Content-Type"] == "application/x-ndjson"
    assert resp.headers["Content-Disposition"] == 'attachment; filename="seekgate-audit.jsonl"'
    body, chunks = await body_chunks(resp)
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert [r["event_id"] for r in lines] == await index.in_search_order(AuditQuery()) and len(lines) == COUNT
    assert chunks >= 3   # a batch a chunk: never the whole export built in memory first
    (one,) = (await search(index.data_dir, AuditQuery(limit=1), index.pool))[0]
    assert lines[0] == one   # the same records as a search, field for field


async def test_filters_offset_and_limit_keep_their_meaning(aiohttp_client: Any, index: Index) -> None:
    client: Client = await aiohttp_client(await app_over(index))
    even = await index.in_search_order(AuditQuery(equals=(("key_id", "even" * 3),)))
    resp = await client.get("/admin/v1/audit", params={"format": "jsonl", "key_id": "even" * 3,
                                                       "offset": "5", "limit": str(EXPORT_BATCH + 7)})
    assert resp.status == 200
    assert [orjson.loads(line)["event_id"] for line in (await resp.read()).splitlines()] == \
        even[5:5 + EXPORT_BATCH + 7]


@pytest.mark.parametrize("params, message", [
    ({"limit": "100001"}, "limit must be a whole number from 0 to 100000"),
    ({"status": "ok"}, "status must be allowed, denied or error"),
    ({"format": "csv"}, "format must be json or jsonl"),
])
async def test_a_bad_export_is_a_400_before_any_body(aiohttp_client: Any, index: Index, params: dict[str, str],
                                                     message: str) -> None:
    client: Client = await aiohttp_client(await app_over(index))
    resp = await client.get("/admin/v1/audit", params={"format": "jsonl", **params})
    assert resp.status == 400 and resp.headers["Content-Type"].startswith("application/json")
    assert await resp.json() == {"error": message}


async def test_records_indexed_mid_export_neither_repeat_nor_push_older_ones_out(index: Index) -> None:
    before = await index.in_search_order(AuditQuery())
    got: list[str] = []
    batches = export(index.data_dir, AuditQuery(limit=COUNT), index.pool, batch=300)
    async for rows in batches:
        if not got:   # newer records than any sent, between the first batch and the second
            await index.insert(records(40, first=COUNT, start=START + COUNT))
        got += [r["event_id"] for r in rows]
    assert got == before


async def test_an_index_failing_mid_export_ends_the_response_broken(aiohttp_client: Any, index: Index,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the status line, a truncated file must not look whole: no last chunk, the connection dropped."""
    real = admin_audit.export

    async def fails_after_one_batch(*args: Any, **kwargs: Any) -> AsyncGenerator[list[dict[str, Any]], None]:
        batches = real(*args, **kwargs)
        yield await anext(batches)
        await index.break_it()
        async for rows in batches:
            yield rows

    monkeypatch.setattr(admin_audit, "export", fails_after_one_batch)
    client: Client = await aiohttp_client(await app_over(index))
    resp = await client.get("/admin/v1/audit", params={"format": "jsonl"})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert SEEN[-1].status == "error" and SEEN[-1].reason.startswith("export_broke_mid_response: ")
