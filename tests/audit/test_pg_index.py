"""The shared audit index in PostgreSQL (audit/pg_index.py): what the SQLite index keeps, it keeps too.

Records carry optional JSON fields (the OpenAI API's `openai`, an admin call's `admin`) beside
`parent_key_ids`; the shared table must store them and answer the same filters (`--protocol`,
`--endpoint`) as the SQLite index, or a replica's index writes fail. The console's aggregates
(usage, overview, a key's minted sessions) must answer the same over both indexes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.audit import pg_index
from proxy.audit.index import AuditIndex
from proxy.audit.jsonl import rotated_files
from proxy.audit.search import GROUPS, PERIODS, AuditQuery, minted_sessions, overview, search, usage
from proxy.audit.writer import _iso_utc, build_record
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



async def test_an_insert_failing_with_an_unnamed_error_is_retried_and_the_indexer_lives_on(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncpg raises InternalClientError on a connection caught by a server shutting down: the loop must survive it."""
    store = await open_url(pg_url, migrate=True)
    try:
        pool = pg_index.pool_of(store)
        index = pg_index.SharedAuditIndex(pool, "replica-c")
        real = pg_index.SharedAuditIndex._insert
        failures = [asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress")]

        async def first_fails(self: pg_index.SharedAuditIndex, batch: list[dict[str, Any]]) -> None:
            if failures:
                raise failures.pop()
            await real(self, batch)

        monkeypatch.setattr(pg_index.SharedAuditIndex, "_insert", first_fails)
        index.start()
        index.submit([record("r-retried", "http")])
        async with asyncio.timeout(30):
            await index.flush()
        assert not failures and index.healthy
        await index.close()
        assert [r["request_id"] for r in await pg_index.query(pool, since=time.time() - 60)
                if r["request_id"] == "r-retried"] == ["r-retried"]
    finally:
        await store.close()


def served(rid: str, ts: float, key_id: str, owner: str, model: str | None, status: str, tokens: tuple[int, int] | None,
           admin: dict[str, Any] | None = None) -> dict[str, Any]:
    rec = record(rid, "http")
    rec.update(timestamp=_iso_utc(ts), key_id=key_id, actor=owner, model=model, status=status,
               input_tokens=tokens[0] if tokens else None, output_tokens=tokens[1] if tokens else None)
    if admin is not None:
        rec["admin"] = admin
    return rec


async def test_usage_overview_and_minted_sessions_answer_the_same_over_both_indexes(
        pg_url: str, tmp_path: Path) -> None:
    """One node reads its SQLite index, replicas the shared one: the console must not tell them apart."""
    now = 1_780_000_000.0 + 86400 * 3 + 3600 * 5 + 17   # a fixed time, mid-day: days and minutes known
    recs = [
        served("a1", now - 30, "key-a", "alice", "deepseek", "allowed", (5, 7)),
        served("a2", now - 95, "key-a", "alice", "deepseek", "allowed", (3, 2)),
        served("a3", now - 100, "key-a", "alice", "deepseek", "denied", None),
        served("b1", now - 86400 - 60, "key-b", "bob", "echo", "allowed", (11, 0)),
        served("b2", now - 40 * 86400, "key-b", "bob", "echo", "allowed", (1, 1)),   # last month, past the window
        served("c1", now - 10, "key-c", "carol", "deepseek", "error", (2, 0)),
        served("m1", now - 20, "key-a", "alice", None, "allowed", None,
               {"action": "sessions.mint", "target": "a" * 32}),
        served("m2", now - 2 * 86400, "key-a", "alice", None, "allowed", None,
               {"action": "console.signin", "target": "b" * 32}),
        served("m3", now - 25, "key-a", "alice", None, "denied", None,
               {"action": "sessions.mint", "target": "c" * 32}),
    ]
    local = AuditIndex(tmp_path / "audit" / "audit.db")
    (tmp_path / "audit").mkdir()
    local.open()
    local.insert(recs)
    local.close()
    store = await open_url(pg_url, migrate=True)
    try:
        pool = pg_index.pool_of(store)
        index = pg_index.SharedAuditIndex(pool, "replica-c")
        index.start()
        index.submit(recs)
        async with asyncio.timeout(30):
            await index.flush()
        await index.close()
        for group in GROUPS:
            for period in PERIODS:
                one = await usage(tmp_path, group, period, now - 35 * 86400)
                shared = await usage(tmp_path / "elsewhere", group, period, now - 35 * 86400, pool)
                assert shared == one and one, (group, period, one, shared)
        day = await usage(tmp_path, "key", "day", now - 35 * 86400)
        assert [(r["key"], r["requests"], r["tokens"]) for r in day] == [("key-a", 1, 0), ("key-b", 1, 11),
                                                                    ("key-a", 3, 17)]   # m2, b1, a1+a2+m1
        one_view = await overview(tmp_path, now=now)
        shared_view = await overview(tmp_path / "elsewhere", now=now, pool=pool)
        assert shared_view == one_view
        assert sum(m["requests"] for m in one_view["per_minute"]) == 6
        assert sum(m["errors"] for m in one_view["per_minute"]) == 3
        assert [k["name"] for k in one_view["top_keys"]] == ["key-a", "key-c"]
        one_minted = await minted_sessions(tmp_path, "key-a", now - 3 * 86400)
        assert await minted_sessions(tmp_path / "elsewhere", "key-a", now - 3 * 86400, pool) == one_minted
        assert [s["jti"] for s in one_minted] == ["a" * 32, "b" * 32]
    finally:
        await store.close()


async def test_a_replica_on_postgresql_indexes_into_the_shared_table_only(pg_url: str, tmp_path: Path) -> None:
    """No audit.db beside the JSONL file: every reader of such a replica reads the shared table."""
    from proxy.audit.writer import AuditWriter

    store = await open_url(pg_url, migrate=True)
    try:
        pool = pg_index.pool_of(store)
        writer = AuditWriter(tmp_path)
        writer.share(pool, "replica-only-shared")
        async with writer:
            writer.submit(record("r-only-shared", "http"))
            async with asyncio.timeout(30):
                await writer.flush()
            assert [r["request_id"] for r in await pg_index.query(pool, actor=None, since=time.time() - 60)
                    if r["request_id"] == "r-only-shared"] == ["r-only-shared"]
        assert (tmp_path / "audit" / "audit.jsonl").read_text().count("r-only-shared") == 1
        assert not (tmp_path / "audit" / "audit.db").exists()
    finally:
        await store.close()


async def test_records_left_unindexed_by_a_stopped_replica_are_indexed_when_it_starts_again(tmp_path: Path) -> None:
    """PostgreSQL down long enough for more records than the restart's fixed tail: none is missing after."""
    from proxy.audit.writer import AuditWriter
    from tests.backends import PrivatePostgres

    server = PrivatePostgres()
    server.start()
    try:
        store = await open_url(server.url, migrate=True)
        writer = AuditWriter(tmp_path)
        writer.share(pg_index.pool_of(store), "replica-outage")
        await writer.start()
        server.stop()
        total = 12_500   # more than the 10,000 lines a start re-reads in any case
        for i in range(total):
            writer.submit(record(f"outage-{i}", "http"))
        async with asyncio.timeout(60):
            while writer.queue_depth():
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)   # the indexer has tried (and failed) at least once since
        assert writer.shared is not None and writer.shared.pending() == total
        await writer.close()       # gives up on the index after its timeout: the JSONL has them
        await store.close()

        server.start()
        store = await open_url(server.url)
        try:
            writer = AuditWriter(tmp_path)
            writer.share(pg_index.pool_of(store), "replica-outage")
            async with writer:
                async with asyncio.timeout(60):
                    await writer.flush()
            async with store.pool.acquire() as conn:   # type: ignore[attr-defined]
                indexed = await conn.fetchval("SELECT count(*) FROM audit_events WHERE request_id LIKE 'outage-%'")
            assert indexed == total
        finally:
            await store.close()
    finally:
        server.destroy()


async def test_the_unindexed_mark_follows_the_backlog_while_the_indexer_backs_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed (no close) late in a long back-off must leave a mark that counts what arrived during it:
    a start re-reads the mark plus a fixed 10 000-line tail, and a busy replica adds more than that in 5 s."""

    class Down:
        def acquire(self) -> Any:
            raise OSError("connection refused")

    monkeypatch.setattr(pg_index, "RETRY_S", (5.0, 5.0))   # the longest back-off from the first failure
    mark = tmp_path / "audit.jsonl.unindexed"
    index = pg_index.SharedAuditIndex(Down(), "replica-killed", mark=mark)
    index.start()
    try:
        index.submit([record("before", "http")])
        async with asyncio.timeout(5):
            while not mark.exists():           # the first attempt failed: back-off begins
                await asyncio.sleep(0.02)
        assert mark.read_text() == "1"
        index.submit([record(f"during-{i}", "http") for i in range(50)])
        await asyncio.sleep(1.5)               # well inside the 5 s back-off
        assert mark.read_text() == "51"        # what a start after a kill -9 now would re-read
    finally:
        assert index._task is not None
        index._task.cancel()
        await asyncio.gather(index._task, return_exceptions=True)


async def test_an_outage_catch_up_past_the_memory_bound_reads_the_files_rotated_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records dropped from memory during an outage are re-read from the JSONL; audit.jsonl rotated
    meanwhile, so the older of them are in rotated files, and the catch-up must read those too."""
    from proxy.audit.writer import AuditWriter
    from tests.backends import PrivatePostgres

    monkeypatch.setattr(pg_index, "MAX_PENDING", 100)   # the bound a long outage reaches, made small
    server = PrivatePostgres()
    server.start()
    try:
        store = await open_url(server.url, migrate=True)
        try:
            writer = AuditWriter(tmp_path, max_bytes=16 * 1024, batch_size=16)   # rotates every few dozen records
            writer.share(pg_index.pool_of(store), "replica-rotated")
            await writer.start()
            server.stop()
            total = 400
            for i in range(total):
                writer.submit(record(f"rotated-{i}", "http"))
            async with asyncio.timeout(60):
                while writer.queue_depth():
                    await asyncio.sleep(0.05)
            assert len(rotated_files(tmp_path / "audit")) > 2
            server.start()
            async with asyncio.timeout(60):
                await writer.flush()
            await writer.close()
            async with store.pool.acquire() as conn:   # type: ignore[attr-defined]
                indexed = await conn.fetchval(
                    "SELECT count(*) FROM audit_events WHERE request_id LIKE 'rotated-%'")
            assert indexed == total
        finally:
            await store.close()
    finally:
        server.destroy()
