"""Tests for proxy.store.sqlite: real SQLite files, schema, chains, revocation, fail-closed reads."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

from proxy.errors import StoreUnavailable
from proxy.store import KeyRecord, KeyStore, StoreConflict
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


async def test_round_trip_every_field(store: SqliteStore) -> None:
    full = KeyRecord(key_id="abcdefghijkl", secret_hash="f" * 64, tier="app", owner="team-x",
                     roles=("infer", "admin"), labels={"env": "prod", "team": "x"},
                     models=("deepseek",), allowed_cidrs=("10.0.0.0/8", "::1/128"),
                     parent_id=None, prefix="sgk_abcdefghijkl", last4="Ab3d",
                     created_at=1700000000.5, expires_at=1800000000.0, revoked_at=None)
    await store.create_key(full)
    assert await store.get_key("abcdefghijkl") == full
    assert await store.get_key("missing") is None


async def test_chain_is_key_then_ancestors_nearest_first(store: SqliteStore) -> None:
    await store.create_key(rec("root-app"))
    await store.create_key(rec("mid", parent="root-app", tier="device"))
    await store.create_key(rec("leaf", parent="mid", tier="device"))
    assert [r.key_id for r in await store.get_chain("leaf")] == ["leaf", "mid", "root-app"]
    assert [r.key_id for r in await store.get_chain("root-app")] == ["root-app"]
    assert await store.get_chain("missing") == []


async def test_list_keys(store: SqliteStore) -> None:
    await store.create_key(rec("b", created=2.0))
    await store.create_key(rec("a", created=1.0))
    assert [r.key_id for r in await store.list_keys()] == ["a", "b"]


async def test_list_expiring_returns_only_unrevoked_keys_due_within_the_window(store: SqliteStore) -> None:
    now = 10_000.0
    for key_id, expires in (("later", now + 7200), ("soon", now + 600), ("sooner", now + 60), ("gone", now - 1),
                            ("edge", now + 3600), ("never", None), ("revoked", now + 30)):
        await store.create_key(replace(rec(key_id), expires_at=expires))
    await store.revoke_key("revoked", now)
    assert [r.key_id for r in await store.list_expiring(3600, now)] == ["sooner", "soon", "edge"]
    assert await store.list_expiring(3600, now + 7200) == []   # everything due has expired by then


async def test_conflicts(store: SqliteStore) -> None:
    await store.create_key(rec("a"))
    with pytest.raises(StoreConflict):
        await store.create_key(rec("a"))
    with pytest.raises(StoreConflict):
        await store.create_key(rec("orphan", parent="nope"))
    # A refused write leaves no transaction open behind it.
    await store.create_key(rec("b"))
    assert [r.key_id for r in await store.list_keys()] == ["a", "b"]


async def test_revoke_cascades_to_descendants_only(store: SqliteStore) -> None:
    await store.create_key(rec("app"))
    await store.create_key(rec("dev1", parent="app", tier="device"))
    await store.create_key(rec("dev2", parent="app", tier="device"))
    await store.create_key(rec("grandchild", parent="dev1", tier="device"))
    await store.create_key(rec("other"))
    await store.create_key(rec("other-dev", parent="other", tier="device"))

    assert await store.revoke_key("dev1", now=50.0) == 2
    assert await store.revoke_key("app", now=60.0) == 2        # dev1 subtree already done
    assert await store.revoke_key("app", now=70.0) == 0
    assert await store.revoke_key("missing", now=70.0) == 0

    revoked = {r.key_id: r.revoked_at for r in await store.list_keys()}
    assert revoked == {"app": 60.0, "dev1": 50.0, "dev2": 60.0, "grandchild": 50.0,
                       "other": None, "other-dev": None}


async def test_has_any_admin(store: SqliteStore) -> None:
    assert not await store.has_any_admin()
    await store.create_key(rec("u", tier="user", roles=("reader", "administrator")))
    assert not await store.has_any_admin()
    await store.create_key(rec("adm", tier="user", roles=("reader", "admin")))
    assert await store.has_any_admin()
    await store.revoke_key("adm", now=1.0)
    assert not await store.has_any_admin()


async def test_revision_bumps_on_changes_and_is_seen_by_other_connections(
        tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    async with await SqliteStore.open(path) as a, await SqliteStore.open(path) as b:
        start = await b.revision()
        await a.create_key(rec("k"))
        assert await b.revision() == start + 1
        await a.revoke_key("k", now=1.0)
        assert await b.revision() == start + 2
        await a.revoke_key("k", now=2.0)  # nothing changed, nothing to invalidate
        assert await b.revision() == start + 2
        assert (await b.get_key("k")).revoked_at == 1.0  # type: ignore[union-attr]


async def test_data_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    async with await SqliteStore.open(path) as s:
        await s.create_key(rec("k", roles=("admin",)))
        rev = await s.revision()
    async with await SqliteStore.open(path) as s:
        assert (await s.get_key("k")) == rec("k", roles=("admin",))
        assert await s.revision() == rev


async def test_reads_on_a_closed_store_fail_closed(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "keys.db")
    await s.close()
    for call in (s.get_key("k"), s.get_chain("k"), s.list_keys(), s.has_any_admin(),
                 s.revision()):
        with pytest.raises(StoreUnavailable):
            await call


async def test_missing_table_fails_closed(store: SqliteStore) -> None:
    with sqlite3.connect(store.path) as raw:
        raw.execute("DROP TABLE keys")
    with pytest.raises(StoreUnavailable):
        await store.get_chain("k")
    with pytest.raises(StoreUnavailable):
        await store.revoke_key("k", now=1.0)


@pytest.mark.parametrize("column,value", [
    ("roles", "not json"), ("roles", '{"a": 1}'), ("labels", "[1]"), ("models", "[1]"),
])
async def test_corrupt_rows_fail_closed(store: SqliteStore, column: str, value: str) -> None:
    await store.create_key(rec("k"))
    with sqlite3.connect(store.path) as raw:
        raw.execute(f"UPDATE keys SET {column} = ? WHERE key_id = 'k'", (value,))
    with pytest.raises(StoreUnavailable):
        await store.get_key("k")
    with pytest.raises(StoreUnavailable):
        await store.get_chain("k")


async def test_parent_cycle_in_a_hand_edited_db_fails_closed(store: SqliteStore) -> None:
    await store.create_key(rec("a"))
    await store.create_key(rec("b", parent="a"))
    with sqlite3.connect(store.path) as raw:
        raw.execute("UPDATE keys SET parent_id = 'b' WHERE key_id = 'a'")
    with pytest.raises(StoreUnavailable, match="cycle"):
        await store.get_chain("b")
    assert await store.revoke_key("a", now=1.0) == 2


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
