"""Expiry warnings: one key_expiring audit event per key and expiry, across passes, restarts and the real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.audit.writer import AuditWriter, query_audit
from proxy.keys.expiry_events import ACTION, announce_expiring, expiry_event, watch_expiry_events
from proxy.keys.issue import iso_utc, issue_key
from proxy.keys.lifecycle import rotate_key
from proxy.local.triton import TritonProcess, free_ports
from proxy.store.sqlite import SqliteStore
from tests.gateway import Gateway, audit_records, wait_for

PEPPER = b"e" * 32
H = 3600.0
T0 = 1_900_000_000.0   # a fixed clock: every pass is given its `now`
WINDOW = 72 * H


async def test_one_event_per_key_and_expiry_across_passes_and_reopens(tmp_path: Path) -> None:
    db = tmp_path / "seekgate.db"
    events: list[dict[str, Any]] = []
    async with await SqliteStore.open(db) as store:
        soon, soon_token = await issue_key(store, PEPPER, tier="user", owner="alice", expires_in_s=10 * H, now=T0)
        app, _ = await issue_key(store, PEPPER, tier="app", owner="svc", expires_in_s=100 * H, now=T0)
        dev, _ = await issue_key(store, PEPPER, tier="device", owner="cam", parent_id=app.key_id, now=T0)
        dead, _ = await issue_key(store, PEPPER, tier="user", owner="bob", expires_in_s=5 * H, now=T0)
        await store.revoke_key(dead.key_id, T0)
        await issue_key(store, PEPPER, tier="user", owner="carol", expires_in_s=None, now=T0)

        announced = await announce_expiring(store, events.append, WINDOW, T0)
        assert [r.key_id for r in announced] == [soon.key_id]
        assert await announce_expiring(store, events.append, WINDOW, T0 + H) == []   # the next pass: nothing new
    async with await SqliteStore.open(db) as store:   # a restart: remembered in the store
        assert await announce_expiring(store, events.append, WINDOW, T0 + 2 * H) == []
        # The app key and its device (clamped to the app's expiry) enter the window 28 h in.
        announced = await announce_expiring(store, events.append, WINDOW, T0 + 29 * H)
        assert sorted(r.key_id for r in announced) == sorted([app.key_id, dev.key_id])
        # A rotation brings the app key's expiry forward: a new expiry, announced once more.
        await rotate_key(store, PEPPER, app.key_id, 2 * H, now=T0 + 30 * H)
        announced = await announce_expiring(store, events.append, WINDOW, T0 + 30 * H)
        assert [r.key_id for r in announced] == [app.key_id]
        assert await announce_expiring(store, events.append, WINDOW, T0 + 31 * H) == []
        stored_hash = (await store.get_key(soon.key_id)).secret_hash  # type: ignore[union-attr]

    # Within a pass: soonest first, then by key id.
    assert [e["key_id"] for e in events] == [soon.key_id, *sorted([app.key_id, dev.key_id]), app.key_id]
    first = events[0]
    assert (first["action"], first["key_id"], first["tier"]) == (ACTION, soon.key_id, "user")
    assert first["expires_at"] == iso_utc(T0 + 10 * H) and first["expires_in_s"] == 10 * H
    assert events[-1]["expires_at"] == iso_utc(T0 + 32 * H)   # the rotated expiry
    text = json.dumps(events)
    assert soon_token not in text and stored_hash not in text and "secret" not in text


async def test_events_land_in_the_audit_log_and_the_loop_keeps_going(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with await SqliteStore.open(tmp_path / "seekgate.db") as store:
        rec, _ = await issue_key(store, PEPPER, tier="app", owner="svc", expires_in_s=H, now=T0)
        writer = AuditWriter(data)
        await writer.start()
        passes: list[float] = []

        def clock() -> float:
            passes.append(T0 + len(passes) * 60)
            return passes[-1]
        task = asyncio.create_task(watch_expiry_events(store, writer.submit, WINDOW, 0.0, clock))
        while len(passes) < 5:   # several passes at interval 0: the event is written once
            await asyncio.sleep(0)
        task.cancel()
        await writer.close()
    rows = await query_audit(data, key_id=rec.key_id)
    assert [(r["action"], r["tier"], r["actor"]) for r in rows] == [(ACTION, "app", "seekgate")]
    assert rows[0]["reason"] == f"expires_at {iso_utc(T0 + H)}"
    lines = [json.loads(line) for line in (data / "audit" / "audit.jsonl").read_text().splitlines()]
    assert [(ln["key_id"], ln["expires_at"]) for ln in lines] == [(rec.key_id, iso_utc(T0 + H))]


def test_expiry_event_is_built_from_public_fields_only() -> None:
    from proxy.store import KeyRecord
    rec = KeyRecord(key_id="abcdefghijkl", secret_hash="HASH-NEVER-SHOWN", tier="user", owner="o",
                    created_at=T0, expires_at=T0 + H)
    event = expiry_event(rec, T0)
    assert "HASH-NEVER-SHOWN" not in json.dumps(event)
    assert {"timestamp", "event_id", "key_id", "tier", "action", "expires_at"} <= set(event)


# ---------------------------------------------------------------- the real server

@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw-expiry")


def _gateway(root: Path, triton: TritonProcess) -> Gateway:
    return Gateway(root, triton.http_url, free_ports(3), **{"auth.expiry_check_interval_s": 3600.0})


def _events(gw: Gateway, key_id: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(gw) if r.get("action") == ACTION and r.get("key_id") == key_id]


def test_the_server_announces_at_start_and_a_restart_does_not_repeat(root: Path, triton: TritonProcess) -> None:
    gw = _gateway(root, triton)
    soon_id, _ = gw.key(owner="alice", expires_in_s=2 * H)
    gw.start()
    try:
        assert wait_for(lambda: len(_events(gw, soon_id)) == 1, 30), audit_records(gw)
    finally:
        gw.stop()
    # A key entering the window while the server was down; it expires after the first, so the
    # start pass handles it after the first one: once it is there, the first was checked again.
    later_id, _ = gw.key(owner="bob", expires_in_s=3 * H)
    again = _gateway(root, triton).start()
    try:
        assert wait_for(lambda: len(_events(again, later_id)) == 1, 30), audit_records(again)
        assert len(_events(again, soon_id)) == 1
        event = _events(again, later_id)[0]
        assert (event["tier"], event["actor"]) == ("user", "seekgate")
    finally:
        again.stop()
