"""Tests for proxy.store.pg_schema: numbered migrations on a real PostgreSQL, once each, however many run."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.errors import StoreUnavailable
from proxy.store.pg_schema import LATEST, MIGRATIONS, migrate, schema_version
from proxy.store.postgres import PostgresStore


async def test_migrate_applies_every_step_once_and_then_nothing(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        assert await schema_version(conn) == 0
        assert await migrate(conn) == [v for v, _, _ in MIGRATIONS]
        assert await migrate(conn) == []   # idempotent
        assert await schema_version(conn) == LATEST
        assert await conn.fetchval("SELECT value FROM meta WHERE name = 'revision'") == 0
    finally:
        await conn.close()


async def test_replicas_migrating_at_once_apply_each_step_exactly_once(pg_url: str) -> None:
    conns = [await asyncpg.connect(pg_url) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(v for a in applied for v in a) == [v for v, _, _ in MIGRATIONS]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(MIGRATIONS)
    finally:
        for c in conns:
            await c.close()


async def test_a_store_refuses_an_unmigrated_database_and_says_what_to_run(pg_url: str) -> None:
    with pytest.raises(StoreUnavailable, match="seekgate db migrate"):
        await PostgresStore.open(pg_url)
    async with await PostgresStore.open(pg_url, auto_migrate=True) as store:
        assert await store.revision() == 0


async def test_an_unreachable_server_is_store_unavailable_without_the_password() -> None:
    with pytest.raises(StoreUnavailable) as info:
        await PostgresStore.open("postgresql://seekgate:s3cret@127.0.0.1:1/nowhere", timeout_s=1.0)
    assert "s3cret" not in str(info.value)
