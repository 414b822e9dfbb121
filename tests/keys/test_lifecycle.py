"""Key lifecycle: rotation with grace, leak response with a usage report, expiry warning (lib, CLI, admin API)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from proxy.audit.writer import AuditWriter, build_record
from proxy.context import Principal, RequestContext, Resource
from proxy.errors import StoreUnavailable, Unauthenticated
from proxy.frontend.http import watch_expiring
from proxy.keys.issue import iso_utc, issue_key, key_status
from proxy.keys.lifecycle import LifecycleError, compromise_key, rotate_key, subtree_records
from proxy.local.triton import TritonProcess, free_ports
from proxy.metrics import Metrics
from proxy.paths import store_path
from proxy.settings import StoreSettings
from proxy.steps.app_state import STATE
from proxy.steps.authn import authenticate
from proxy.store import KeyRecord, KeyStore
from proxy.store.backend import open_store
from proxy.store.sqlite import SqliteStore
from tests.admin.test_keys import PEPPER, SEEN, make_app
from tests.cli.test_main import Cli, cli, store_cli  # noqa: F401  (the fixtures)
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, wait_for

H = 3600.0
T0 = 1_900_000_000.0   # a fixed clock: authn takes `now`, so grace ends are exact, no sleeps


async def _store(tmp_path: Path) -> SqliteStore:
    return await SqliteStore.open(tmp_path / "seekgate.db")


async def _auth(store: SqliteStore, token: str, now: float, ip: str = "10.0.0.7") -> Principal:
    return await authenticate(token, store, PEPPER, ip, now)


async def _write_audit(data_dir: Path, uses: list[tuple[float, Principal, str, str, int, int]]) -> None:
    """Real audit records (build_record + AuditWriter) for (time, principal, ip, model, in, out)."""
    writer = AuditWriter(data_dir)
    await writer.start()
    for when, who, ip, model, tin, tout in uses:
        ctx = RequestContext(request_id=f"r{when}", client_ip=ip, method="POST",
                             path=f"/v2/models/{model}/generate", started_wall=when, principal=who,
                             resource=Resource(f"model:{model}", "infer", model=model),
                             http_status=200, input_tokens=tin, output_tokens=tout)
        writer.submit(build_record(ctx, duration_ms=1.0))
    await writer.close()


# ---------------------------------------------------------------- rotation

async def test_rotation_grace_end_to_end_with_a_controlled_clock(tmp_path: Path) -> None:
    async with await _store(tmp_path) as store:
        old, old_token = await issue_key(store, PEPPER, tier="app", owner="svc", roles=["user"],
                                         labels={"team": "nlp"}, models=["deepseek"],
                                         allowed_cidrs=["10.0.0.0/24"], limits={"rpm": 60},
                                         expires_in_s=365 * 24 * H, now=T0)
        rot = await rotate_key(store, PEPPER, old.key_id, 24 * H, now=T0 + H)
        new = rot.new
        assert new.key_id != old.key_id and rot.token.startswith(f"sgk_{new.key_id}_")
        scope = ("tier", "owner", "roles", "labels", "models", "allowed_cidrs", "parent_id", "limits")
        assert all(getattr(new, f) == getattr(old, f) for f in scope)
        assert rot.old.expires_at == T0 + 25 * H and new.expires_at == T0 + H + 365 * 24 * H
        # Both work during the grace; at its end the old key stops, the successor goes on.
        assert (await _auth(store, old_token, T0 + 25 * H - 1)).key_id == old.key_id
        assert (await _auth(store, rot.token, T0 + 25 * H - 1)).key_id == new.key_id
        with pytest.raises(Unauthenticated, match="expired"):
            await _auth(store, old_token, T0 + 25 * H)
        assert (await _auth(store, rot.token, T0 + 30 * H)).key_id == new.key_id


async def test_rotation_never_extends_and_refuses_dead_or_unknown_keys(tmp_path: Path) -> None:
    async with await _store(tmp_path) as store:
        soon, _ = await issue_key(store, PEPPER, tier="user", owner="bob", expires_in_s=2 * H, now=T0)
        rot = await rotate_key(store, PEPPER, soon.key_id, 24 * H, now=T0)
        assert rot.old.expires_at == T0 + 2 * H   # the earlier expiry stands
        forever, _ = await issue_key(store, PEPPER, tier="user", owner="bob", expires_in_s=None, now=T0)
        rot = await rotate_key(store, PEPPER, forever.key_id, 24 * H, now=T0)
        assert rot.old.expires_at == T0 + 24 * H and rot.new.expires_at is None
        await store.revoke_key(forever.key_id, T0)
        with pytest.raises(LifecycleError, match="revoked"):
            await rotate_key(store, PEPPER, forever.key_id, H, now=T0)
        with pytest.raises(LifecycleError, match="not found") as info:
            await rotate_key(store, PEPPER, "aaaaaaaaaaaa", H, now=T0)
        assert info.value.not_found


@pytest.fixture(params=["sqlite", "postgres"])
def store_settings(request: pytest.FixtureRequest) -> StoreSettings:
    """Where the key store lives: a SQLite file under the test's data dir, or a fresh PostgreSQL database."""
    return StoreSettings(url=request.getfixturevalue("pg_url") if request.param == "postgres" else "",
                         auto_migrate=True)


async def test_a_key_in_its_grace_is_not_rotated_again(store_settings: StoreSettings, tmp_path: Path) -> None:
    store = await open_store(store_settings, tmp_path)
    try:
        old, _ = await issue_key(store, PEPPER, tier="user", owner="bob", expires_in_s=100 * H, now=T0)
        rot = await rotate_key(store, PEPPER, old.key_id, 24 * H, now=T0)
        assert rot.old.successor_id == rot.new.key_id and rot.new.successor_id is None
        ids = sorted(r.key_id for r in await store.page_keys(10))
        with pytest.raises(LifecycleError) as info:
            await rotate_key(store, PEPPER, old.key_id, H, now=T0 + H)
        assert info.value.conflict and not info.value.not_found
        assert str(info.value) == (f"key {old.key_id} was already rotated: its successor is {rot.new.key_id} "
                                   f"({old.key_id} works until {iso_utc(T0 + 24 * H)}); "
                                   f"to rotate again, rotate {rot.new.key_id}")
        # Nothing changed: no third key, the grace the first rotation set stands.
        assert sorted(r.key_id for r in await store.page_keys(10)) == ids
        assert await store.get_key(old.key_id) == rot.old
        # The successor is rotated as any key; a revoked successor leaves the old key unrotatable too.
        again = await rotate_key(store, PEPPER, rot.new.key_id, H, now=T0 + H)
        await store.revoke_key(again.new.key_id, T0 + H)
        with pytest.raises(LifecycleError, match=f"{again.new.key_id} is revoked: issue a new key") as info:
            await rotate_key(store, PEPPER, rot.new.key_id, H, now=T0 + H)
        assert info.value.conflict
    finally:
        await store.close()


async def test_two_rotations_of_one_key_at_once_make_one_successor(store_settings: StoreSettings,
                                                                    tmp_path: Path) -> None:
    """Two processes (two store connections) rotate the same key at the same moment: one wins."""
    first, second = await open_store(store_settings, tmp_path), await open_store(store_settings, tmp_path)
    try:
        old, _ = await issue_key(first, PEPPER, tier="user", owner="bob", expires_in_s=100 * H, now=T0)
        results = await asyncio.gather(rotate_key(first, PEPPER, old.key_id, H, now=T0),
                                       rotate_key(second, PEPPER, old.key_id, H, now=T0), return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], LifecycleError) and lost[0].conflict
        assert f"its successor is {won[0].new.key_id}" in str(lost[0])
        # Both read the key before either wrote, so both made a successor; the claim refused the second,
        # whose successor, never shown, was never stored: the old key and the winner's, nothing else.
        status = {r.key_id: key_status(r, T0) for r in await first.page_keys(10)}
        assert status == {old.key_id: "active", won[0].new.key_id: "active"}
        assert (await first.get_key(old.key_id)).successor_id == won[0].new.key_id  # type: ignore[union-attr]
    finally:
        await first.close()
        await second.close()


async def _raw_sql(settings: StoreSettings, data_dir: Path, sqlite_sql: str, postgres_sql: str) -> None:
    """Edit the database behind the store's back, as an operator (or a failing disk) would."""
    if not settings.url:
        with sqlite3.connect(store_path(data_dir)) as db:
            db.execute(sqlite_sql)
        return
    conn = await asyncpg.connect(settings.url)
    try:
        await conn.execute(postgres_sql)
    finally:
        await conn.close()


@pytest.mark.parametrize("failing", ["parent_id", "expires_at"])
async def test_a_rotation_the_store_fails_part_way_leaves_nothing_and_a_retry_works(
        store_settings: StoreSettings, tmp_path: Path, failing: str) -> None:
    """The store fails after the successor is claimed: moving the devices, or bringing the expiry forward.

    A real failure inside the database (a trigger raising on that UPDATE), not a stand-in store. Half a
    rotation would leave the key naming a successor whose secret nobody was shown, and every retry refused.
    """
    store = await open_store(store_settings, tmp_path)
    try:
        app, _ = await issue_key(store, PEPPER, tier="app", owner="svc", expires_in_s=100 * H, now=T0)
        dev, _ = await issue_key(store, PEPPER, tier="device", owner="cam", parent_id=app.key_id, now=T0)
        stored = await store.page_keys(10)
        await _raw_sql(store_settings, tmp_path,
                       f"CREATE TRIGGER fail_rotation BEFORE UPDATE OF {failing} ON keys "
                       "BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
                       "CREATE FUNCTION fail_rotation() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; "
                       f"CREATE TRIGGER fail_rotation BEFORE UPDATE OF {failing} ON keys "
                       "FOR EACH ROW EXECUTE FUNCTION fail_rotation()")
        with pytest.raises(StoreUnavailable, match="injected failure"):
            await rotate_key(store, PEPPER, app.key_id, H, now=T0 + H)
        after_failure = await store.page_keys(10)

        await _raw_sql(store_settings, tmp_path, "DROP TRIGGER fail_rotation", "DROP TRIGGER fail_rotation ON keys")
        rot = await rotate_key(store, PEPPER, app.key_id, H, now=T0 + 2 * H)   # not "rotate <a key nobody holds>"
        assert after_failure == stored   # the failed one left nothing: no successor, none claimed, no device moved
        assert sorted(r.key_id for r in await store.page_keys(10)) == sorted([app.key_id, dev.key_id, rot.new.key_id])
        assert rot.old.successor_id == rot.new.key_id and rot.old.expires_at == T0 + 3 * H
        assert rot.moved == (dev.key_id,)
    finally:
        await store.close()


async def test_rotating_an_app_key_moves_its_devices_to_the_successor(tmp_path: Path) -> None:
    async with await _store(tmp_path) as store:
        app, app_token = await issue_key(store, PEPPER, tier="app", owner="svc", roles=["user"],
                                         models=["deepseek"], allowed_cidrs=["10.0.0.0/24"],
                                         limits={"rpm": 60}, expires_in_s=100 * H, now=T0)
        dev, dev_token = await issue_key(store, PEPPER, tier="device", owner="cam", parent_id=app.key_id,
                                         allowed_cidrs=["10.0.0.0/28"], now=T0)
        gone, _ = await issue_key(store, PEPPER, tier="device", owner="old-cam", parent_id=app.key_id, now=T0)
        await store.revoke_key(gone.key_id, T0)
        rot = await rotate_key(store, PEPPER, app.key_id, 24 * H, now=T0 + H)
        assert rot.moved == (dev.key_id,)
        assert (await store.get_key(dev.key_id)).parent_id == rot.new.key_id   # type: ignore[union-attr]
        assert (await store.get_key(gone.key_id)).parent_id == app.key_id      # type: ignore[union-attr]
        assert rot.new.expires_at is not None and dev.expires_at is not None
        assert rot.new.expires_at >= dev.expires_at   # the device still never outlives its parent

        # After the grace the old app key is dead; the device works on, under the successor now:
        # its chain, limits and model list are the successor's, and its CIDR still binds it.
        after = T0 + 25 * H + 1
        with pytest.raises(Unauthenticated, match="expired"):
            await _auth(store, app_token, after)
        p = await _auth(store, dev_token, after, ip="10.0.0.3")
        assert p.parents == (rot.new.key_id,) and p.models == ("deepseek",)
        assert [k for k, _, _ in p.limits] == [dev.key_id, rot.new.key_id]
        assert p.limits[1][2] == {"rpm": 60}
        with pytest.raises(Unauthenticated, match="ip_not_allowed"):
            await _auth(store, dev_token, after, ip="10.0.0.99")   # in the app's /24, not the device's /28
        # Revoking the old key no longer touches the device; revoking the successor does.
        await store.revoke_key(app.key_id, after)
        assert (await _auth(store, dev_token, after, ip="10.0.0.3")).key_id == dev.key_id
        assert await store.revoke_key(rot.new.key_id, after) == 2
        with pytest.raises(Unauthenticated, match="revoked"):
            await _auth(store, dev_token, after, ip="10.0.0.3")


async def test_rotating_a_device_key_keeps_its_parent(tmp_path: Path) -> None:
    async with await _store(tmp_path) as store:
        app, _ = await issue_key(store, PEPPER, tier="app", owner="svc", roles=["user"],
                                 allowed_cidrs=["10.0.0.0/16"], expires_in_s=100 * H, now=T0)
        dev, _ = await issue_key(store, PEPPER, tier="device", owner="cam", parent_id=app.key_id,
                                 allowed_cidrs=["10.0.1.0/24"], now=T0)
        rot = await rotate_key(store, PEPPER, dev.key_id, H, now=T0 + H)
        assert rot.new.parent_id == app.key_id and rot.new.allowed_cidrs == ("10.0.1.0/24",)
        assert rot.new.expires_at == app.expires_at   # clamped to the parent


# ---------------------------------------------------------------- leak response

async def test_compromise_revokes_subtree_replaces_and_reports_real_audit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with await _store(tmp_path) as store:
        app, app_token = await issue_key(store, PEPPER, tier="app", owner="svc", roles=["user"],
                                         models=["deepseek"], expires_in_s=None, now=T0)
        dev, dev_token = await issue_key(store, PEPPER, tier="device", owner="cam",
                                         parent_id=app.key_id, now=T0)
        other, other_token = await issue_key(store, PEPPER, tier="user", owner="eve", now=T0)
        p_app = await _auth(store, app_token, T0 + 1)
        p_dev = await _auth(store, dev_token, T0 + 1)
        p_other = await _auth(store, other_token, T0 + 1)
        await _write_audit(data, [
            (T0 - 100, p_app, "1.1.1.1", "deepseek", 1, 1),           # before creation: not in report
            (T0 + 10, p_app, "10.0.0.1", "deepseek", 5, 7),
            (T0 + 20, p_dev, "203.0.113.9", "deepseek", 3, 4),
            (T0 + 30, p_app, "203.0.113.9", "deepseek", 2, 0),
            (T0 + 40, p_other, "10.9.9.9", "deepseek", 100, 100),     # someone else's key
        ])
        done = await compromise_key(store, PEPPER, data, app.key_id, now=T0 + 50, actor="admin1")
        assert done.revoked == [app.key_id, dev.key_id]
        for token in (app_token, dev_token):
            with pytest.raises(Unauthenticated, match="revoked"):
                await _auth(store, token, T0 + 51)
        assert (await _auth(store, done.token, T0 + 51)).key_id == done.new.key_id
        assert (done.new.roles, done.new.models, done.new.owner) == (app.roles, app.models, app.owner)
        assert (await _auth(store, other_token, T0 + 51)).key_id == other.key_id

    r = done.report
    assert r["uses"] == 3 and r["uses_by_key"] == {app.key_id: 2, dev.key_id: 1}
    assert r["client_ips"] == {"203.0.113.9": 2, "10.0.0.1": 1}
    assert r["models"] == {"deepseek": 3} and r["tokens"] == {"input": 10, "output": 11}
    assert [e["client_ip"] for e in r["events"]] == ["10.0.0.1", "203.0.113.9", "203.0.113.9"]
    assert r["first_use"] < r["last_use"] and r["replacement_key_id"] == done.new.key_id
    assert done.report_path.parent == data / "reports"
    assert json.loads(done.report_path.read_text())["uses"] == 3
    assert done.report_path.stat().st_mode & 0o077 == 0
    assert done.token not in done.report_path.read_text()


async def test_leak_report_flushes_the_audit_writer_first(tmp_path: Path) -> None:
    """A use still queued in the audit writer when the key is revoked is in the report."""
    data = tmp_path / "data"
    async with await _store(tmp_path) as store:
        app, token = await issue_key(store, PEPPER, tier="app", owner="svc", expires_in_s=None, now=T0)
        who = await _auth(store, token, T0 + 1)
        writer = AuditWriter(data)
        await writer.start()
        # The index write is held until someone flushes: without the flush the report reads an
        # index that lacks the use, however the tasks happen to be scheduled.
        gate = asyncio.Event()
        insert_rows, flush = writer._insert_rows, writer.flush

        async def held_insert(batch: list[dict[str, Any]]) -> None:
            await gate.wait()
            await insert_rows(batch)

        async def opening_flush() -> None:
            gate.set()
            await flush()
        writer._insert_rows = held_insert  # type: ignore[method-assign]
        writer.flush = opening_flush  # type: ignore[method-assign]
        ctx = RequestContext(request_id="last-use", client_ip="198.51.100.7", method="POST",
                             path="/v2/models/deepseek/generate", started_wall=T0 + 5, principal=who,
                             resource=Resource("model:deepseek", "infer", model="deepseek"), http_status=200,
                             input_tokens=2, output_tokens=3)
        writer.submit(build_record(ctx, duration_ms=1.0))
        done = await compromise_key(store, PEPPER, data, app.key_id, now=T0 + 6, audit=writer)
        gate.set()
        await writer.close()
    assert done.report["audit_flushed"] is True
    assert done.report["uses"] == 1 and done.report["client_ips"] == {"198.51.100.7": 1}
    assert done.report["tokens"] == {"input": 2, "output": 3}


async def test_leak_report_says_when_the_audit_flush_timed_out(tmp_path: Path) -> None:
    class Stuck:
        async def flush(self) -> None:
            await asyncio.Event().wait()
    async with await _store(tmp_path) as store:
        app, _ = await issue_key(store, PEPPER, tier="user", owner="u", now=T0)
        done = await compromise_key(store, PEPPER, tmp_path / "data", app.key_id, now=T0 + 1, audit=Stuck(),
                                    flush_timeout_s=0.01)
        assert done.report["audit_flushed"] is False and done.revoked == [app.key_id]
        cli_done = await compromise_key(store, PEPPER, tmp_path / "data", done.new.key_id, now=T0 + 2)
        assert cli_done.report["audit_flushed"] is None   # no writer in this process


async def test_subtree_walks_every_level_breadth_first(tmp_path: Path) -> None:
    async with await _store(tmp_path) as store:
        for k, p in (("a", None), ("b", "a"), ("c", "b"), ("d", None), ("e", "a")):
            await store.create_key(KeyRecord(key_id=k, secret_hash="", tier="app", owner="o", parent_id=p,
                                             created_at=0))
        assert [r.key_id for r in await subtree_records(store, "a")] == ["a", "b", "e", "c"]
        assert [r.key_id for r in await subtree_records(store, "d")] == ["d"]
        assert await subtree_records(store, "missing") == []


class CountingStore:
    """The real store, counting the calls made through it: each one a query (or a few, chunked)."""

    def __init__(self, store: KeyStore) -> None:
        self.store, self.calls = store, Counter[str]()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted


def reference_subtree(keys: list[KeyRecord], key_id: str) -> list[str]:
    """Breadth first, each key's children oldest first (created_at, then key id): what the walk returns."""
    below: dict[str | None, list[KeyRecord]] = {}
    for k in sorted(keys, key=lambda k: (k.created_at, k.key_id)):
        below.setdefault(k.parent_id, []).append(k)
    out, level = [key_id], [key_id]
    while level:
        level = [c.key_id for p in level for c in below.get(p, [])]
        out += level
    return out


async def test_subtree_walk_is_one_query_per_level(store_settings: StoreSettings, tmp_path: Path) -> None:
    """A wide subtree (more keys on one level than one SQLite IN (...) takes) in as many calls as it is deep."""
    store = await open_store(store_settings, tmp_path)
    try:
        def make(key_id: str, parent: str | None, created: float) -> KeyRecord:
            return KeyRecord(key_id=key_id, secret_hash="", tier="app", owner="o", parent_id=parent,
                             created_at=created)
        await store.create_key(make("root", None, 0.0))
        await store.create_key(make("other", None, 0.0))
        await store.create_key(make("not-mine", "other", 1.0))
        # Creation times out of id order, and ties broken by the id, on every level.
        for i in range(1100):
            await store.create_key(make(f"d{i:04d}", "root", float((i * 7) % 50)))
        for i in range(0, 1100, 100):
            for j in range(3):
                await store.create_key(make(f"g{i:04d}-{j}", f"d{i:04d}", float(3 - j)))
        await store.create_key(make("deepest", "g0500-1", 9.0))
        await store.revoke_key("d0300", now=5.0)   # revoked keys are walked too: what a revocation's audit shows
        counting = CountingStore(store)
        got = [r.key_id for r in await subtree_records(cast(KeyStore, counting), "root")]
        assert got == reference_subtree(await store.list_keys(), "root")
        assert len(got) == 1 + 1100 + 33 + 1 and "not-mine" not in got
        depth = 3   # root -> d -> g -> deepest
        assert sum(counting.calls.values()) <= 1 + depth + 1, counting.calls   # the root, each level, the empty one
    finally:
        await store.close()


# ---------------------------------------------------------------- expiry warning

def expiring(keys: list[KeyRecord], within_s: float, now: float) -> list[KeyRecord]:
    """The reference the store's expiry queries are checked against: active keys due within `within_s`."""
    soon = [k for k in keys if key_status(k, now) == "active" and k.expires_at is not None
            and k.expires_at <= now + within_s]
    return sorted(soon, key=lambda k: (k.expires_at or 0.0, k.key_id))


async def test_expiring_lists_active_keys_within_the_window_and_the_gauge(tmp_path: Path) -> None:
    async with await _store(tmp_path) as store:
        now = time.time()
        soon, _ = await issue_key(store, PEPPER, tier="user", owner="a", expires_in_s=10 * H, now=now)
        later, _ = await issue_key(store, PEPPER, tier="app", owner="b", expires_in_s=100 * H, now=now)
        dead, _ = await issue_key(store, PEPPER, tier="user", owner="c", expires_in_s=H, now=now)
        await store.revoke_key(dead.key_id, now)
        await issue_key(store, PEPPER, tier="user", owner="d", expires_in_s=None, now=now)
        keys = await store.list_keys()
        assert [k.key_id for k in expiring(keys, 72 * H, now)] == [soon.key_id]
        assert [k.key_id for k in expiring(keys, 200 * H, now)] == [soon.key_id, later.key_id]
        # The store's own queries, which the periodic checks use, agree with the CLI's filter.
        for window in (72 * H, 200 * H):
            assert await store.list_expiring(window, now) == expiring(keys, window, now)
        assert await store.count_expiring(200 * H, now) == {"app": 1, "user": 1}

        metrics = Metrics()
        state = cast(Any, type("S", (), {"store": store, "metrics": metrics})())
        task = asyncio.create_task(watch_expiring(state, interval=0.01))
        await asyncio.sleep(0.1)
        task.cancel()
        text = metrics.render()[0].decode()
        assert 'seekgate_keys_expiring{tier="user"} 1.0' in text
        assert 'seekgate_keys_expiring{tier="app"} 0.0' in text


# ---------------------------------------------------------------- CLI

def test_cli_rotate_list_expiring_and_revoke_compromised(cli: Cli) -> None:  # noqa: F811
    made = cli.json("keys", "create", "--tier", "user", "--name", "alice", "--role", "user",
                    "--expires", "30d", "--json")
    rot = cli.json("keys", "rotate", made["key_id"], "--grace", "24h", "--json")
    assert rot["key"].startswith("sgk_" + rot["key_id"]) and rot["old"]["id"] == made["key_id"]
    assert rot["roles"] == ["user"] and rot["owner"] == "alice"
    listed = cli.json("keys", "list", "--expiring", "72h", "--json")["keys"]
    assert [k["id"] for k in listed] == [made["key_id"]]   # the old key, in its grace
    code, _, err = cli("keys", "rotate", made["key_id"], "--grace", "never")
    assert code == 2 and "--grace" in err

    child_parent = cli.json("keys", "create", "--tier", "app", "--name", "svc", "--role", "user", "--json")
    dev = cli.json("keys", "create", "--tier", "device", "--name", "cam", "--parent",
                   child_parent["key_id"], "--json")
    leak = cli.json("keys", "revoke", child_parent["key_id"], "--compromised", "--json")
    assert leak["revoked"] == [child_parent["key_id"], dev["key_id"]]
    assert leak["replacement"]["key"].startswith("sgk_" + leak["replacement"]["key_id"])
    assert leak["report"]["uses"] == 0 and leak["report"]["keys"] == leak["revoked"]
    assert Path(leak["report_path"]).parent == cli.data / "reports"
    statuses = {k["id"]: k["status"] for k in cli.json("keys", "list", "--json")["keys"]}
    assert statuses[child_parent["key_id"]] == statuses[dev["key_id"]] == "revoked"
    assert statuses[leak["replacement"]["key_id"]] == "active"
    assert store_path(cli.data).exists()
    code, _, err = cli("keys", "revoke", "aaaaaaaaaaaa", "--compromised")
    assert code == 1 and "not found" in err


def test_cli_refuses_to_rotate_a_key_in_its_grace(store_cli: Cli) -> None:  # noqa: F811
    run = store_cli
    made = run.json("keys", "create", "--tier", "app", "--name", "svc", "--json")
    rot = run.json("keys", "rotate", made["key_id"], "--grace", "24h", "--json")
    assert rot["old"]["successor_id"] == rot["key_id"]
    before = run.json("keys", "list", "--json")["keys"]
    code, out, err = run("keys", "rotate", made["key_id"], "--grace", "1h")
    assert (code, out) == (1, "")
    assert err.strip() == (f"seekgate: key {made['key_id']} was already rotated: its successor is {rot['key_id']} "
                           f"({made['key_id']} works until {rot['old']['expires_at']}); "
                           f"to rotate again, rotate {rot['key_id']}")
    assert run.json("keys", "list", "--json")["keys"] == before   # nothing issued, nothing moved
    assert run.json("keys", "show", made["key_id"], "--json")["successor_id"] == rot["key_id"]
    actions = [json.loads(line)["admin"]["action"]
               for line in (run.data / "audit" / "audit.cli.jsonl").read_text().splitlines()]
    assert actions == ["keys.create", "keys.rotate"]   # a refusal changed nothing, so nothing to audit


# ---------------------------------------------------------------- admin API

@pytest.mark.asyncio(loop_scope="session")
async def test_admin_refuses_to_rotate_a_key_in_its_grace_with_409(aiohttp_client: Any, tmp_path: Path) -> None:
    SEEN.clear()
    client: TestClient = await aiohttp_client(await make_app(tmp_path))  # type: ignore[type-arg]
    made = await (await client.post("/admin/v1/keys", json={"tier": "user", "name": "alice"})).json()
    rot = await (await client.post(f"/admin/v1/keys/{made['key_id']}/rotate", json={"grace": "24h"})).json()
    assert rot["old"]["successor_id"] == rot["key_id"]
    resp = await client.post(f"/admin/v1/keys/{made['key_id']}/rotate", json={"grace": "1h"})
    assert resp.status == 409
    assert await resp.json() == {"error": f"key {made['key_id']} was already rotated: its successor is "
                                          f"{rot['key_id']} ({made['key_id']} works until "
                                          f"{rot['old']['expires_at']}); to rotate again, rotate {rot['key_id']}"}
    admin = build_record(SEEN[-1])["admin"]
    assert (admin["action"], admin["target"]) == ("keys.rotate", made["key_id"]) and "after" not in admin
    listed = (await (await client.get("/admin/v1/keys")).json())["keys"]
    assert sorted(k["id"] for k in listed) == sorted([made["key_id"], rot["key_id"]])
    # The successor rotates as any key.
    resp = await client.post(f"/admin/v1/keys/{rot['key_id']}/rotate", json={"grace": "1h"})
    assert resp.status == 201



@pytest.mark.asyncio(loop_scope="session")
async def test_admin_rotate_compromise_expiring_and_audited(aiohttp_client: Any, tmp_path: Path) -> None:
    SEEN.clear()
    client: TestClient = await aiohttp_client(await make_app(tmp_path))  # type: ignore[type-arg]
    resp = await client.post("/admin/v1/keys", json={"tier": "user", "name": "alice", "roles": ["user"],
                                                     "expires": "30d"})
    made = await resp.json()

    resp = await client.post(f"/admin/v1/keys/{made['key_id']}/rotate", json={"grace": "24h"})
    assert resp.status == 201, await resp.text()
    rot = await resp.json()
    assert rot["old"]["id"] == made["key_id"] and rot["key"].startswith("sgk_" + rot["key_id"])
    assert resp.headers["Cache-Control"] == "no-store"
    rec = build_record(SEEN[-1])
    admin = rec["admin"]
    assert (admin["action"], admin["target"], admin["detail"]) == ("keys.rotate", made["key_id"],
                                                                   f"successor {rot['key_id']}")
    # Before and after: the old key's expiry brought forward, the successor made.
    assert list(admin["before"]) == [made["key_id"]] and admin["before"][made["key_id"]]["expires_at"] == \
        made["expires_at"]
    assert admin["after"][made["key_id"]]["expires_at"] == rot["old"]["expires_at"] != made["expires_at"]
    assert admin["after"][rot["key_id"]]["status"] == "active"
    stored = await client.app[STATE].store.get_key(made["key_id"])
    assert rot["key"] not in json.dumps(rec) and made["key"] not in json.dumps(rec)
    assert stored.secret_hash not in json.dumps(rec)
    for body, status in (({"grace": "never"}, 400), ({}, 400), ({"grace": "1h", "x": 1}, 400)):
        assert (await client.post(f"/admin/v1/keys/{made['key_id']}/rotate", json=body)).status == status
    assert (await client.post("/admin/v1/keys/aaaaaaaaaaaa/rotate", json={"grace": "1h"})).status == 404
    assert (await client.get(f"/admin/v1/keys/{made['key_id']}/rotate")).status == 405

    resp = await client.get("/admin/v1/keys", params={"expiring": "72h"})
    assert [k["id"] for k in (await resp.json())["keys"]] == [made["key_id"]]
    assert (await client.get("/admin/v1/keys", params={"expiring": "soon"})).status == 400

    resp = await client.post(f"/admin/v1/keys/{rot['key_id']}/revoke", json={"compromised": True})
    assert resp.status == 200, await resp.text()
    leak = await resp.json()
    assert leak["revoked"] == [rot["key_id"]] and leak["report"]["key_id"] == rot["key_id"]
    new_token = leak["replacement"]["key"]
    state = client.app[STATE]
    assert (await authenticate(new_token, state.store, PEPPER, "127.0.0.1", time.time())).roles == ("user",)
    rec = build_record(SEEN[-1])
    assert rec["admin"]["action"] == "keys.revoke_compromised" and rec["admin"]["target"] == rot["key_id"]
    assert leak["replacement"]["key_id"] in rec["admin"]["detail"] and new_token not in json.dumps(rec)
    assert rec["admin"]["before"][rot["key_id"]]["status"] == "active"
    assert rec["admin"]["after"][rot["key_id"]]["status"] == "revoked"
    assert rec["admin"]["after"][leak["replacement"]["key_id"]]["status"] == "active"
    assert list((tmp_path / "reports").glob(f"compromised-{rot['key_id']}-*.json"))

    # A plain revoke still answers the count; an odd body is refused, not ignored.
    assert (await client.post(f"/admin/v1/keys/{made['key_id']}/revoke", json={"compromised": "yes"})).status == 400
    resp = await client.post(f"/admin/v1/keys/{made['key_id']}/revoke")
    assert (await resp.json()) == {"revoked": 1}
    assert "admin" not in build_record(RequestContext(request_id="x", client_ip="1.2.3.4"))


# ---------------------------------------------------------------- through the real server

@pytest.fixture(scope="module")
def gw(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-lifecycle"), triton.http_url, free_ports(3)).start()
    yield g
    g.stop()


def _generate(gw: Gateway, key: str) -> int:
    return call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": "hi", "max_tokens": 2}, key)[0]


def _admin(gw: Gateway, key: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, raw = call(gw.url + path, "POST", body, key)
    return status, json.loads(raw)


def test_devices_outlive_their_rotated_app_key_through_the_proxy(gw: Gateway) -> None:
    _, admin = gw.key(owner="ops", roles=("admin",))
    app_id, app_key = gw.key(tier="app", owner="billing", roles=(), expires_in_s=30 * 24 * H)
    dev_id, dev_key = gw.key(tier="device", owner="edge-1", roles=(), parent_id=app_id, expires_in_s=24 * H)
    assert _generate(gw, dev_key) == 200
    status, rot = _admin(gw, admin, f"/admin/v1/keys/{app_id}/rotate", {"grace": "24h"})
    assert status == 201, rot
    gw.end_grace(app_id)
    assert _generate(gw, app_key) == 401                   # the old app key is over
    assert _generate(gw, dev_key) == 200                   # its device is not: it moved to the successor
    assert _generate(gw, rot["key"]) == 200
    assert wait_for(lambda: any(r.get("admin", {}).get("action") == "keys.rotate" for r in audit_records(gw)), 3.0)
    record = [r for r in audit_records(gw) if r.get("admin", {}).get("action") == "keys.rotate"][-1]
    assert record["admin"]["before"][dev_id]["parent_id"] == app_id
    assert record["admin"]["after"][dev_id]["parent_id"] == rot["key_id"]
    status, revoked = _admin(gw, admin, f"/admin/v1/keys/{rot['key_id']}/revoke", {})
    assert (status, revoked) == (200, {"revoked": 2})
    assert _generate(gw, dev_key) == 401                   # revoking the successor revoked the device


def test_the_leak_report_holds_the_use_just_before_the_revocation(gw: Gateway) -> None:
    _, admin = gw.key(owner="ops", roles=("admin",))
    app_id, app_key = gw.key(tier="app", owner="leaky", roles=())
    assert _generate(gw, app_key) == 200
    status, leak = _admin(gw, admin, f"/admin/v1/keys/{app_id}/revoke", {"compromised": True})
    assert status == 200, leak
    report = leak["report"]
    assert report["audit_flushed"] is True and report["uses"] == 1
    assert report["events"][-1]["path"] == "/v2/models/deepseek/generate"
    assert report["events"][-1]["http_status"] == 200
    assert _generate(gw, app_key) == 401 and _generate(gw, leak["replacement"]["key"]) == 200


def test_the_leak_report_holds_the_uses_of_sessions_minted_from_the_leaked_key(gw: Gateway) -> None:
    """Sessions are no stored keys: their uses are found through the parent_key_ids of their records."""
    _, admin = gw.key(owner="ops", roles=("admin",))
    app_id, app_key = gw.key(tier="app", owner="minter", roles=())
    dev_id, dev_key = gw.key(tier="device", owner="edge-9", roles=(), parent_id=app_id)
    status, _, raw = call(gw.url + "/v1/sessions", "POST", b"", app_key)
    assert status == 200, raw
    session = json.loads(raw)
    assert [_generate(gw, session["token"]) for _ in range(2)] == [200, 200]
    assert _generate(gw, dev_key) == 200
    status, leak = _admin(gw, admin, f"/admin/v1/keys/{app_id}/revoke", {"compromised": True})
    assert status == 200, leak
    report = leak["report"]
    assert report["audit_flushed"] is True
    assert report["uses_by_key"] == {app_id: 1, session["jti"]: 2, dev_id: 1}   # the app key's use: the mint
    session_uses = [e for e in report["events"] if e["key_id"] == session["jti"]]
    assert [(e["tier"], e["parent_key_ids"], e["path"], e["http_status"]) for e in session_uses] == \
        [("session", [app_id], "/v2/models/deepseek/generate", 200)] * 2
    assert _generate(gw, session["token"]) == 401
