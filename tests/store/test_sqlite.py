"""Tests for proxy.store.sqlite: what only the SQLite file has (WAL, file mode, old files, raw corruption).

The KeyStore contract both backends share is tested in test_backend.py."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from proxy.errors import StoreUnavailable
from proxy.store import KeyRecord, KeyStore
from proxy.store.sqlite import SqliteStore


def rec(key_id: str, *, parent: str | None = None, tier: str = "app",
        roles: tuple[str, ...] = (), created: float = 1000.0) -> KeyRecord:
    return KeyRecord(key_id=key_id, secret_hash="ab" * 32, tier=tier, owner=f"owner-{key_id}",
                     roles=roles, parent_id=parent, created_at=created)


@pytest_asyncio.fixture(loop_scope="function")
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "keys.db")
    yield s
    await s.close()


async def test_open_creates_wal_database_with_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keys.db"
    async with await SqliteStore.open(path) as s:
        assert isinstance(s, KeyStore)
        await s.create_key(rec("a"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_connections_creating_one_new_database_at_once_all_open_it(tmp_path: Path) -> None:
    """The workers of a first start open a store nobody has made yet, at the same moment."""
    for attempt in range(60):   # a collision is a matter of timing: a few in 60 rounds without the retry
        path = tmp_path / f"round{attempt}" / "keys.db"
        opened = await asyncio.gather(*[SqliteStore.open(path) for _ in range(8)], return_exceptions=True)
        failed = [r for r in opened if isinstance(r, BaseException)]
        for store in opened:
            if isinstance(store, SqliteStore):
                await store.close()
        assert not failed, (attempt, failed)


@pytest.mark.parametrize("column,value", [("roles", "not json"), ("limits", "{")])
async def test_rows_that_are_not_json_fail_closed(store: SqliteStore, column: str, value: str) -> None:
    await store.create_key(rec("k"))
    with sqlite3.connect(store.path) as raw:
        raw.execute(f"UPDATE keys SET {column} = ? WHERE key_id = 'k'", (value,))
    with pytest.raises(StoreUnavailable):
        await store.get_key("k")
    with pytest.raises(StoreUnavailable):
        await store.get_chain("k")


async def test_open_on_an_unusable_path_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreUnavailable):
        await SqliteStore.open(tmp_path / "dir.db")


async def test_limits_round_trip_and_old_databases_gain_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as raw:   # a database from before limits existed
        raw.executescript("""
            CREATE TABLE keys (key_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, tier TEXT NOT NULL,
                owner TEXT NOT NULL, roles TEXT NOT NULL DEFAULT '[]', labels TEXT NOT NULL DEFAULT '{}',
                models TEXT NOT NULL DEFAULT '[]', allowed_cidrs TEXT NOT NULL DEFAULT '[]',
                parent_id TEXT REFERENCES keys(key_id), prefix TEXT NOT NULL DEFAULT '',
                last4 TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, expires_at REAL, revoked_at REAL);
            INSERT INTO keys (key_id, secret_hash, tier, owner, created_at) VALUES ('old', 'ab', 'app', 'o', 1.0);
        """)
    async with await SqliteStore.open(path) as s:
        old = await s.get_key("old")
        assert old is not None and old.limits == {}
        await s.create_key(KeyRecord(key_id="new", secret_hash="ab", tier="user", owner="n", created_at=2.0,
                                     limits={"rpm": 5, "daily_tokens": 0}))
    async with await SqliteStore.open(path) as s:   # reopening does not add the column twice
        new = await s.get_key("new")
        assert new is not None and new.limits == {"rpm": 5, "daily_tokens": 0}


async def test_connections_upgrading_one_old_database_at_once_all_open_it(tmp_path: Path) -> None:
    """The workers of the first start after an upgrade open a database that lacks a column (here successor_id,
    of a database made before key rotation recorded successors), at the same moment: each must open it, not
    fail on the column another worker added between its look at the table and its ALTER TABLE."""
    for attempt in range(30):
        path = tmp_path / f"round{attempt}" / "keys.db"
        path.parent.mkdir()
        with sqlite3.connect(path) as raw:   # a database from before successor_id existed
            raw.executescript("""
                CREATE TABLE keys (key_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, tier TEXT NOT NULL,
                    owner TEXT NOT NULL, roles TEXT NOT NULL DEFAULT '[]', labels TEXT NOT NULL DEFAULT '{}',
                    models TEXT NOT NULL DEFAULT '[]', allowed_cidrs TEXT NOT NULL DEFAULT '[]',
                    parent_id TEXT REFERENCES keys(key_id), prefix TEXT NOT NULL DEFAULT '',
                    last4 TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, expires_at REAL, revoked_at REAL,
                    limits TEXT NOT NULL DEFAULT '{}', pepper_version INTEGER NOT NULL DEFAULT 1);
                INSERT INTO keys (key_id, secret_hash, tier, owner, created_at) VALUES ('old', 'ab', 'app', 'o', 1.0);
            """)
        opened = await asyncio.gather(*[SqliteStore.open(path) for _ in range(8)], return_exceptions=True)
        failed = [r for r in opened if isinstance(r, BaseException)]
        for store in opened:
            if isinstance(store, SqliteStore):
                old = await store.get_key("old")
                assert old is not None and old.successor_id is None
                await store.close()
        assert not failed, (attempt, failed)
