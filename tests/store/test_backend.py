"""The KeyStore contract, run against both backends (proxy/store/backend.py): SQLite and PostgreSQL.

Real servers only: a SQLite file in tmp_path, and a fresh PostgreSQL database per test
(tests/conftest.py `pg_url`). Raw SQL from outside the store plays the hand-edited or broken
database; each backend gets the statement in its own dialect.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from proxy.errors import StoreUnavailable
from proxy.settings import StoreSettings
from proxy.store import KeyRecord, KeyStore, Rotated, StoreConflict
from proxy.store.backend import Store, open_secret_rows, open_store

BACKENDS = ("sqlite", "postgres")


def rec(key_id: str, *, parent: str | None = None, tier: str = "app",
        roles: tuple[str, ...] = (), created: float = 1000.0) -> KeyRecord:
    return KeyRecord(key_id=key_id, secret_hash="ab" * 32, tier=tier, owner=f"owner-{key_id}",
                     roles=roles, parent_id=parent, created_at=created)


@dataclass
class Backend:
    """One place a store lives: open more connections to it, or edit it behind the store's back."""

    kind: str
    data_dir: Path
    url: str

    @property
    def settings(self) -> StoreSettings:
        return StoreSettings(url=self.url, auto_migrate=True)

    async def open(self) -> Store:
        return await open_store(self.settings, self.data_dir)

    async def raw(self, sqlite_sql: str, postgres_sql: str | None = None) -> None:
        """Run one statement directly on the database (`postgres_sql` where the dialects differ)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.data_dir / "seekgate.db") as db:
                db.execute(sqlite_sql)
            return
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(postgres_sql or sqlite_sql)
        finally:
            await conn.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "postgres":
        return Backend("postgres", tmp_path, request.getfixturevalue("pg_url"))
    return Backend("sqlite", tmp_path, "")


@pytest_asyncio.fixture(loop_scope="function")
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = await backend.open()
    yield s
    await s.close()


async def test_the_store_implements_the_interface(store: Store) -> None:
    assert isinstance(store, KeyStore)


async def test_round_trip_every_field(store: Store) -> None:
    full = KeyRecord(key_id="abcdefghijkl", secret_hash="f" * 64, tier="app", owner="team-x",
                     roles=("infer", "admin"), labels={"env": "prod", "team": "x"},
                     models=("deepseek",), allowed_cidrs=("10.0.0.0/8", "::1/128"),
                     parent_id=None, successor_id="mnopqrstuvwx", prefix="sgk_abcdefghijkl", last4="Ab3d",
                     created_at=1700000000.5, expires_at=1800000000.0, revoked_at=None)
    await store.create_key(full)
    assert await store.get_key("abcdefghijkl") == full
    assert await store.get_key("missing") is None


async def test_chain_is_key_then_ancestors_nearest_first(store: Store) -> None:
    await store.create_key(rec("root-app"))
    await store.create_key(rec("mid", parent="root-app", tier="device"))
    await store.create_key(rec("leaf", parent="mid", tier="device"))
    assert [r.key_id for r in await store.get_chain("leaf")] == ["leaf", "mid", "root-app"]
    assert [r.key_id for r in await store.get_chain("root-app")] == ["root-app"]
    assert await store.get_chain("missing") == []


async def test_list_keys(store: Store) -> None:
    await store.create_key(rec("b", created=2.0))
    await store.create_key(rec("a", created=1.0))
    assert [r.key_id for r in await store.list_keys()] == ["a", "b"]


async def test_children_are_one_level_oldest_first(store: Store) -> None:
    await store.create_key(rec("app"))
    await store.create_key(rec("zz-dev", parent="app", tier="device", created=1001.0))
    await store.create_key(rec("aa-dev", parent="app", tier="device", created=1002.0))
    await store.create_key(rec("b-dev", parent="app", tier="device", created=1001.0))
    await store.create_key(rec("grandchild", parent="b-dev", tier="device", created=1003.0))
    await store.create_key(rec("other"))
    assert [r.key_id for r in await store.children(["app"])] == ["b-dev", "zz-dev", "aa-dev"]
    assert [r.key_id for r in await store.children(["b-dev"])] == ["grandchild"]
    assert [r.key_id for r in await store.children(["b-dev", "other", "app"])] == [
        "b-dev", "zz-dev", "aa-dev", "grandchild"]   # one level of several parents: oldest first across them
    assert await store.children(["other", "missing"]) == [] and await store.children([]) == []


async def test_children_of_more_parents_than_one_statement_takes(store: Store) -> None:
    """A level of 1100 parents (past SQLite's 999 values a statement before 3.32), each child once, oldest first."""
    await store.create_key(rec("app"))
    for i in range(1100):
        await store.create_key(rec(f"dev{i:04d}", parent="app", tier="device", created=float(1100 - i)))
    for i in (1099, 0, 999, 500, 499):
        await store.create_key(rec(f"sub{i:04d}", parent=f"dev{i:04d}", tier="device", created=float(i % 3)))
    got = await store.children([f"dev{i:04d}" for i in range(1100)])
    assert [r.key_id for r in got] == ["sub0000", "sub0999", "sub0499", "sub1099", "sub0500"]


async def test_rotate_claims_stores_moves_and_shortens_in_one_go(store: Store) -> None:
    await store.create_key(replace(rec("old"), expires_at=100.0))
    for key_id, created in (("d2", 3.0), ("d1", 2.0), ("gone", 1.0)):
        await store.create_key(rec(key_id, parent="old", tier="device", created=created))
    await store.revoke_key("gone", now=1.0)
    rev = await store.revision()
    done = await store.rotate("old", rec("new"), 50.0, move_children=True)
    assert done == Rotated(moved=("d1", "d2"))   # revoked children stay where they were revoked
    old = await store.get_key("old")
    assert old is not None and (old.successor_id, old.expires_at) == ("new", 50.0)
    assert await store.get_key("new") == rec("new")
    assert (await store.get_key("gone")).parent_id == "old"  # type: ignore[union-attr]
    assert [r.key_id for r in await store.get_chain("d1")] == ["d1", "new"]
    assert await store.revision() == rev + 1

    # Refused: the first successor stands, nothing written (not even the would-be successor).
    assert await store.rotate("old", rec("other"), 10.0, move_children=True) == Rotated(earlier="new")
    assert await store.get_key("old") == old and await store.get_key("other") is None
    assert await store.revision() == rev + 1
    # The expiry is never extended; a device's rotation leaves its siblings where they are.
    await store.create_key(replace(rec("short"), expires_at=5.0))
    await store.create_key(rec("sibling", parent="short", tier="device"))
    assert await store.rotate("short", rec("short2"), 60.0, move_children=False) == Rotated()
    assert (await store.get_key("short")).expires_at == 5.0  # type: ignore[union-attr]
    assert (await store.get_key("sibling")).parent_id == "short"  # type: ignore[union-attr]
    with pytest.raises(StoreUnavailable):   # keys are never deleted: an unknown one is a broken store
        await store.rotate("missing", rec("new2"), 1.0, move_children=False)
    await store.create_key(replace(rec("fresh"), expires_at=100.0))
    with pytest.raises(StoreUnavailable):   # a successor that can't be stored (a taken id): nothing claimed either
        await store.rotate("fresh", rec("old"), 1.0, move_children=False)
    assert await store.get_key("fresh") == replace(rec("fresh"), expires_at=100.0)


async def test_page_keys_resumes_after_a_key_id_in_the_query(store: Store) -> None:
    for key_id in ("delta", "alpha", "echo", "charlie", "bravo"):
        await store.create_key(rec(key_id))
    assert [r.key_id for r in await store.page_keys(2)] == ["alpha", "bravo"]
    assert [r.key_id for r in await store.page_keys(2, "bravo")] == ["charlie", "delta"]
    await store.create_key(rec("aardvark"))   # added before the cursor: neither repeats nor shifts the rest
    assert [r.key_id for r in await store.page_keys(2, "delta")] == ["echo"]
    assert await store.page_keys(2, "echo") == []
    assert await store.page_keys(5, "zzz") == []


async def test_page_keys_expiring_keeps_the_list_expiring_window(store: Store) -> None:
    now = 10_000.0
    for key_id, expires in (("later", now + 7200), ("soon", now + 600), ("sooner", now + 60), ("gone", now - 1),
                            ("edge", now + 3600), ("never", None), ("revoked", now + 30)):
        await store.create_key(replace(rec(key_id), expires_at=expires))
    await store.revoke_key("revoked", now)
    window = (now, now + 3600)
    assert [r.key_id for r in await store.page_keys(2, expiring=window)] == ["edge", "soon"]
    assert [r.key_id for r in await store.page_keys(2, "soon", window)] == ["sooner"]


async def test_list_expiring_returns_only_unrevoked_keys_due_within_the_window(store: Store) -> None:
    now = 10_000.0
    for key_id, expires in (("later", now + 7200), ("soon", now + 600), ("sooner", now + 60), ("gone", now - 1),
                            ("edge", now + 3600), ("never", None), ("revoked", now + 30)):
        await store.create_key(replace(rec(key_id), expires_at=expires))
    await store.revoke_key("revoked", now)
    assert [r.key_id for r in await store.list_expiring(3600, now)] == ["sooner", "soon", "edge"]
    assert await store.list_expiring(3600, now + 7200) == []   # everything due has expired by then


async def test_conflicts(store: Store) -> None:
    await store.create_key(rec("a"))
    with pytest.raises(StoreConflict):
        await store.create_key(rec("a"))
    with pytest.raises(StoreConflict):
        await store.create_key(rec("orphan", parent="nope"))
    # A refused write leaves no transaction open behind it.
    await store.create_key(rec("b"))
    assert [r.key_id for r in await store.list_keys()] == ["a", "b"]


async def test_revoke_cascades_to_descendants_only(store: Store) -> None:
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


async def test_has_any_admin(store: Store) -> None:
    assert not await store.has_any_admin()
    await store.create_key(rec("u", tier="user", roles=("reader", "administrator")))
    assert not await store.has_any_admin()
    await store.create_key(rec("adm", tier="user", roles=("reader", "admin")))
    assert await store.has_any_admin()
    await store.revoke_key("adm", now=1.0)
    assert not await store.has_any_admin()

async def test_revision_bumps_on_changes_and_is_seen_by_other_connections(backend: Backend) -> None:
    async with await backend.open() as a, await backend.open() as b:
        start = await b.revision()
        await a.create_key(rec("k"))
        assert await b.revision() == start + 1
        await a.revoke_key("k", now=1.0)
        assert await b.revision() == start + 2
        await a.revoke_key("k", now=2.0)  # nothing changed, nothing to invalidate
        assert await b.revision() == start + 2
        assert (await b.get_key("k")).revoked_at == 1.0  # type: ignore[union-attr]


async def test_every_change_moves_the_other_process_change_signal(backend: Backend) -> None:
    """The word the key cache reads on every request: a memory word (SQLite) or LISTEN/NOTIFY (PostgreSQL)."""
    async with await backend.open() as a, await backend.open() as b:
        before = b.change_signal()
        assert b.change_signal() == before   # nothing changed: the word holds still
        await a.create_key(rec("k"))
        for _ in range(200):   # NOTIFY arrives asynchronously; the bound of the issue is 1 s
            if b.change_signal() != before:
                break
            await asyncio.sleep(0.005)
        assert b.change_signal() != before


async def test_data_persists_across_reopen(backend: Backend) -> None:
    async with await backend.open() as s:
        await s.create_key(rec("k", roles=("admin",)))
        rev = await s.revision()
    async with await backend.open() as s:
        assert (await s.get_key("k")) == rec("k", roles=("admin",))
        assert await s.revision() == rev


async def test_reads_on_a_closed_store_fail_closed(backend: Backend) -> None:
    s = await backend.open()
    await s.close()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: s.get_key("k"), lambda: s.get_chain("k"), s.list_keys, s.has_any_admin, s.revision]
    for call in calls:
        with pytest.raises(StoreUnavailable):
            await call()


async def test_missing_table_fails_closed(store: Store, backend: Backend) -> None:
    await backend.raw("DROP TABLE keys", "DROP TABLE keys CASCADE")
    with pytest.raises(StoreUnavailable):
        await store.get_chain("k")
    with pytest.raises(StoreUnavailable):
        await store.revoke_key("k", now=1.0)


@pytest.mark.parametrize("column,value", [
    ("roles", '"not a list"'), ("roles", '{"a": 1}'), ("labels", "[1]"), ("models", "[1]"), ("limits", '{"rpm": "x"}'),
])
async def test_corrupt_rows_fail_closed(store: Store, backend: Backend, column: str, value: str) -> None:
    await store.create_key(rec("k"))
    await backend.raw(f"UPDATE keys SET {column} = '{value}' WHERE key_id = 'k'")
    with pytest.raises(StoreUnavailable):
        await store.get_key("k")
    with pytest.raises(StoreUnavailable):
        await store.get_chain("k")


async def test_parent_cycle_in_a_hand_edited_db_fails_closed(store: Store, backend: Backend) -> None:
    await store.create_key(rec("a"))
    await store.create_key(rec("b", parent="a"))
    await backend.raw("UPDATE keys SET parent_id = 'b' WHERE key_id = 'a'")
    with pytest.raises(StoreUnavailable, match="cycle"):
        await store.get_chain("b")
    assert await store.revoke_key("a", now=1.0) == 2


async def test_rehash_and_pepper_versions(store: Store) -> None:
    await store.create_key(rec("a"))
    await store.create_key(replace(rec("b"), expires_at=5.0))
    assert await store.pepper_versions(now=1.0) == {1: 2}
    assert await store.rehash_secret("a", "ab" * 32, "cd" * 32, 2)
    assert not await store.rehash_secret("a", "ab" * 32, "ef" * 32, 3)   # no longer holds the old hash
    assert (await store.get_key("a")).secret_hash == "cd" * 32  # type: ignore[union-attr]
    assert await store.pepper_versions(now=10.0) == {2: 1}   # b has expired by then


async def test_shorten_expiry(store: Store) -> None:
    await store.create_key(replace(rec("old"), expires_at=100.0))
    assert await store.shorten_expiry("old", 50.0)
    assert not await store.shorten_expiry("old", 60.0)   # never later


async def test_expiry_notices_are_claimed_once(store: Store) -> None:
    await store.create_key(replace(rec("k"), expires_at=100.0))
    assert await store.claim_expiry_notice("k", 100.0, now=1.0)
    assert not await store.claim_expiry_notice("k", 100.0, now=2.0)
    assert await store.count_expiring(1000.0, now=0.0) == {"app": 1}


async def test_secret_rows_compare_and_swap_and_the_session_denylist(store: Store) -> None:
    """The envelope's rows (store/sqlite_secrets.py, store/postgres_secrets.py): one contract, both backends."""
    rows = await open_secret_rows(store)
    assert await rows.newest_dek() is None
    await rows.put_dek("d1", "k1", b"\x00wrapped1", 1.0)
    await rows.put_dek("d2", "k1", b"\x00wrapped2", 2.0)
    assert await rows.newest_dek() == ("d2", "k1", b"\x00wrapped2")
    assert await rows.add_secret("jwt/1", "d1", b"\x01blob", 3.0)
    assert not await rows.add_secret("jwt/1", "d2", b"other", 4.0)   # write-once by name
    assert await rows.add_secret("pepper/1", "d1", b"\x02blob", 5.0)
    assert await rows.secret_names("jwt/") == ["jwt/1"]
    assert await rows.secret_listing("") == [("jwt/1", 3.0), ("pepper/1", 5.0)]
    assert await rows.list_deks() == [("d1", "k1", 1.0, 2), ("d2", "k1", 2.0, 0)]
    assert await rows.rewrap_dek("d1", "k1", "k2", b"rewrapped")
    assert not await rows.rewrap_dek("d1", "k1", "k3", b"late")   # another process got there first
    assert await rows.get_dek("d1") == ("k2", b"rewrapped")
    assert await rows.replace_secret("jwt/1", "d1", "d2", b"re-encrypted")
    assert await rows.secrets_not_under("d2") == ["pepper/1"]
    assert await rows.delete_unused_deks(keep="d2") == []   # d1 still encrypts pepper/1
    assert await rows.delete_secret("pepper/1") and not await rows.delete_secret("pepper/1")
    assert await rows.delete_unused_deks(keep="d2") == ["d1"]
    await rows.record_event("dek", 7.0)
    await rows.record_event("dek", 9.0, only_if_absent=True)
    assert await rows.event_time("dek") == 7.0 and await rows.event_time("root") is None
    rev = await store.revision()
    assert await rows.revoke_session("j" * 32, 10.0) and not await rows.revoke_session("j" * 32, 11.0)
    assert await rows.session_revoked("j" * 32) and not await rows.session_revoked("k" * 32)
    assert await store.revision() == rev + 1   # caches everywhere must drop the session


async def test_reads_while_postgresql_restarts_fail_only_as_store_unavailable() -> None:
    """Every read caught by a server going down is a clear 503, never an unnamed error (a 500).

    asyncpg answers some reads cut off by the shutdown with InternalClientError ("another
    operation is in progress"), which is no PostgresError.
    """
    from proxy.store.postgres import PostgresStore
    from tests.backends import PrivatePostgres

    server = PrivatePostgres()
    server.start()
    try:
        store = await PostgresStore.open(server.url, auto_migrate=True)
        unnamed: list[BaseException] = []
        served = 0
        stop = False

        async def reader() -> None:
            nonlocal served
            while not stop:
                try:
                    await store.get_chain("sgk_probe")
                    served += 1
                except StoreUnavailable:
                    pass
                except Exception as exc:   # noqa: BLE001  (what must never come out of the store)
                    unnamed.append(exc)
                await asyncio.sleep(0)

        readers = [asyncio.create_task(reader()) for _ in range(32)]
        for _ in range(5):
            await asyncio.sleep(0.4)
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(0.2)
            await asyncio.to_thread(server.start)
        await asyncio.sleep(0.5)
        stop = True
        await asyncio.gather(*readers)
        await store.close()
        assert served and not unnamed, [repr(e) for e in unnamed[:3]]
    finally:
        server.destroy()
