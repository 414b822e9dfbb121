"""The shared audit index in PostgreSQL (audit/pg_index.py): what the SQLite index keeps, it keeps too.

Records carry optional JSON fields (the OpenAI API's `openai`, an admin call's `admin`) beside
`parent_key_ids`; the shared table must store them and answer the same filters (`--protocol`,
`--endpoint`) as the SQLite index, or a replica's index writes fail.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from proxy.audit import pg_index
from proxy.audit.search import AuditQuery, search
from proxy.audit.writer import build_record
from proxy.context import RequestContext
from proxy.store.backend import open_url


def record(rid: str, protocol: str, openai: dict[str, Any] | None = None) -> dict[str, Any]:
    ctx = RequestContext(request_id=rid, client_ip="127.0.0.1", protocol=protocol, method="POST",
                         path="/v1/chat/completions" if openai else "/v2/models/m/generate")
    ctx.http_status = 200
    if openai is not None:
        ctx.extra["openai"] = openai
    return build_record(ctx, duration_ms=1.0)


async def test_openai_records_are_indexed_and_filtered_across_replicas(pg_url: str, tmp_path: Path) -> None:
    store = await open_url(pg_url, migrate=True)
    try:
        pool = pg_index.pool_of(store)
        assert pool is not None
        index = pg_index.SharedAuditIndex(pool, "replica-a")
        index.start()
        chat = record("r-chat", "openai", {"endpoint": "/v1/chat/completions", "user": "u1"})
        plain = record("r-plain", "http")
        index.submit([chat, plain])
        async with asyncio.timeout(30):
            await index.flush()
        await index.close()
        assert index.healthy
        found = await pg_index.query(pool, endpoint="/v1/chat/completions", since=time.time() - 60)
        assert [r["request_id"] for r in found] == ["r-chat"]
        assert found[0]["openai"] == {"endpoint": "/v1/chat/completions", "user": "u1"}
        assert {r["request_id"] for r in await pg_index.query(pool, protocol="http")} == {"r-plain"}
        rows, total = await search(tmp_path, AuditQuery(equals=(("endpoint", "/v1/chat/completions"),)), pool)
        assert total == 1 and rows[0]["request_id"] == "r-chat"
        assert (await pg_index.record(pool, chat["event_id"]) or {}).get("openai", {}).get("user") == "u1"
    finally:
        await store.close()


async def test_a_record_postgresql_would_refuse_never_wedges_the_ones_behind_it(pg_url: str) -> None:
    """NUL is not text to PostgreSQL, nor \\u0000 JSON: replaced, so the record and every later one go in."""
    store = await open_url(pg_url, migrate=True)
    try:
        pool = pg_index.pool_of(store)
        index = pg_index.SharedAuditIndex(pool, "replica-b")
        index.start()
        odd = record("r-nul", "http")
        odd["reason"] = "store_unavailable: \x00 in a driver's message"
        odd["parent_key_ids"] = ["k\x00"]
        index.submit([odd, record("r-after", "http")])
        async with asyncio.timeout(30):
            await index.flush()
        await index.close()
        got = {r["request_id"]: r for r in await pg_index.query(pool, since=time.time() - 60)}
        assert set(got) == {"r-nul", "r-after"}
        assert got["r-nul"]["reason"] == "store_unavailable: \ufffd in a driver's message"
    finally:
        await store.close()
