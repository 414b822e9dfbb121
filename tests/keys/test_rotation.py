"""Rotation of data keys, root, session signing keys and pepper: on a schedule, on demand, and under load."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from proxy.cli.crypto import run_crypto
from proxy.cli.main import main
from proxy.errors import Unauthenticated
from proxy.keys.envelope import Envelope
from proxy.keys.hashing import PEPPER_PREFIX
from proxy.keys.issue import issue_key
from proxy.keys.kek import FileKek
from proxy.keys.rotation import DAY_S, Keyring
from proxy.keys.sessions import SIGNING_KEY_PREFIX
from proxy.local.triton import TritonProcess, free_ports
from proxy.paths import store_path
from proxy.settings import Settings, load_settings
from proxy.steps.authn import authenticate, rehashes_settled
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_secrets import SqliteSecretRows
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, wait_for

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings_for(data_dir: Path, **overrides: Any) -> Settings:
    return load_settings(None, env={}, overrides={"data_dir": str(data_dir), **overrides})


async def open_keyring(data_dir: Path, store: SqliteStore, clock: Clock, **overrides: Any) -> Keyring:
    """A keyring on an injected clock (the envelope's row times follow it too)."""
    rows = await SqliteSecretRows.open(store)
    envelope = Envelope(rows, FileKek.load_or_create(data_dir), clock)
    return await Keyring.open(envelope, rows, store, settings_for(data_dir, **overrides), data_dir, clock)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(store_path(tmp_path))
    try:
        yield s
    finally:
        await s.close()


async def test_dek_and_root_rotate_on_their_schedules(tmp_path: Path, store: SqliteStore) -> None:
    clock = Clock()
    ring = await open_keyring(tmp_path, store, clock)
    audited: list[dict[str, Any]] = []
    ring.on_scheduled = audited.append
    dek, root = await ring.envelope.current_dek_id(), ring.envelope.kek.key_id
    assert await ring.maintain() == {}
    clock.now = T0 + 29 * DAY_S
    assert await ring.maintain() == {}
    assert audited == []
    clock.now = T0 + 30 * DAY_S
    done = await ring.maintain()
    assert done["dek"] != dek and done["reencrypted"] == 2   # the pepper and the signing key
    assert await ring.envelope.current_dek_id() == done["dek"]
    assert [(r["admin"]["action"], r["admin"]["before"], r["admin"]["after"]) for r in audited] == \
        [("crypto.scheduled-rotate-dek", {"dek": dek}, {"dek": done["dek"]})]
    clock.now = T0 + 90 * DAY_S
    done = await ring.maintain()
    assert done["root"] != root and ring.envelope.kek.key_id == done["root"]
    # The data key was due again too (day 60): root first, then the data key, one record each.
    assert [r["admin"]["action"] for r in audited] == \
        ["crypto.scheduled-rotate-dek", "crypto.scheduled-rotate-root", "crypto.scheduled-rotate-dek"]
    assert (audited[1]["admin"]["before"], audited[1]["admin"]["after"]) == ({"root": root}, {"root": done["root"]})
    status = await ring.status()
    assert status["root"]["deks_not_rewrapped"] == 0 and status["dek"]["rows_not_reencrypted"] == 0
    assert status["root"]["due_at"] == T0 + 180 * DAY_S
    # 0 days: on demand only.
    clock.now = T0 + 10_000 * DAY_S
    idle = await open_keyring(tmp_path, store, clock, **{"crypto.dek_rotation_days": 0,
                                                          "crypto.root_rotation_days": 0})
    assert await idle.maintain() == {}


async def test_jwt_rotation_signs_with_the_new_kid_at_once_and_drops_the_old_after_ttl_plus_leeway(
        tmp_path: Path, store: SqliteStore) -> None:
    clock = Clock()
    ring = await open_keyring(tmp_path, store, clock)
    pepper = ring.pepper
    _, token = await issue_key(store, pepper, tier="user", owner="alice", roles=("user",), now=T0)
    parent = await authenticate(token, store, ring.pepper, "10.0.0.1", T0)
    old_kid = ring.sessions.active_kid
    old_token = ring.sessions.mint(parent, T0).token
    clock.now = T0 + 10
    result = await ring.rotate_jwt()
    assert result["kid"] != old_kid and sorted(result["verifying"]) == sorted([old_kid, result["kid"]])
    new_token = ring.sessions.mint(parent, clock.now).token
    assert jwt.get_unverified_header(new_token)["kid"] == result["kid"]
    # The old kid verifies until every token it signed has expired: TTL (900 s) + leeway (60 s).
    keep = 900 + 60
    clock.now = T0 + 10 + keep - 1
    assert "jwt_retired" not in await ring.maintain()
    await ring.refresh()
    await authenticate(old_token, store, ring.pepper, "10.0.0.1", T0 + 899, ring.sessions)
    clock.now = T0 + 10 + keep
    assert (await ring.maintain())["jwt_retired"] == [old_kid]
    await ring.refresh()
    assert ring.sessions.kids == [result["kid"]]
    assert await ring.envelope.names(SIGNING_KEY_PREFIX) == [SIGNING_KEY_PREFIX + result["kid"]]
    with pytest.raises(Unauthenticated) as e:
        await authenticate(old_token, store, ring.pepper, "10.0.0.1", T0 + 899, ring.sessions)
    assert e.value.reason == "session_unknown_kid"


async def test_a_kid_made_by_another_process_verifies_here_at_once(tmp_path: Path, store: SqliteStore) -> None:
    here = await open_keyring(tmp_path, store, Clock(time.time()))
    there = await open_keyring(tmp_path, store, Clock(time.time()))
    _, token = await issue_key(store, there.pepper, tier="user", owner="alice", now=time.time())
    parent = await authenticate(token, store, there.pepper, "10.0.0.1", time.time())
    await there.rotate_jwt()
    minted = there.sessions.mint(parent, time.time())
    assert jwt.get_unverified_header(minted.token)["kid"] not in here.sessions.kids
    p = await authenticate(minted.token, store, here.pepper, "10.0.0.1", time.time(), here.sessions)
    assert p.key_id == minted.jti and there.sessions.active_kid in here.sessions.kids


async def test_pepper_rotation_rehashes_each_key_on_its_next_successful_use(tmp_path: Path,
                                                                             store: SqliteStore) -> None:
    clock = Clock()
    ring = await open_keyring(tmp_path, store, clock)   # publish delay: 3 x 2 s refresh interval
    rec, token = await issue_key(store, ring.pepper, tier="user", owner="alice", now=T0)
    dead, dead_token = await issue_key(store, ring.pepper, tier="user", owner="bob", now=T0)
    await store.revoke_key(dead.key_id, T0)
    assert rec.pepper_version == 1
    assert (await ring.rotate_pepper())["pepper_version"] == 2
    await ring.refresh()
    assert ring.pepper.version == 1 and ring.pepper.versions == [1, 2]   # not published yet
    clock.now = T0 + 6
    await ring.refresh()
    assert ring.pepper.version == 2
    # A wrong secret re-hashes nothing.
    with pytest.raises(Unauthenticated):
        await authenticate(token[:-6] + "AAAAAA", store, ring.pepper, "10.0.0.1", clock.now)
    assert (await store.get_key(rec.key_id)).pepper_version == 1   # type: ignore[union-attr]
    await authenticate(token, store, ring.pepper, "10.0.0.1", clock.now)
    await rehashes_settled()   # written in the background, after the request was answered
    after = await store.get_key(rec.key_id)
    assert after is not None and after.pepper_version == 2 and after.secret_hash != rec.secret_hash
    await authenticate(token, store, ring.pepper, "10.0.0.1", clock.now)   # and it keeps working
    # New keys hash under version 2; version 1 goes once no live key needs it (the revoked one does not).
    fresh, _ = await issue_key(store, ring.pepper, tier="user", owner="carol", now=clock.now)
    assert fresh.pepper_version == 2
    assert (await ring.maintain())["pepper_retired"] == [1]
    assert await ring.envelope.names(PEPPER_PREFIX) == [PEPPER_PREFIX + "2"]
    await ring.refresh()
    await authenticate(token, store, ring.pepper, "10.0.0.1", clock.now)
    assert (await ring.status())["pepper"]["rows_by_version"] == {2: 2}


async def test_a_rehash_never_holds_a_request_behind_another_process_s_write_lock(tmp_path: Path) -> None:
    # A busy timeout longer than the test would ever wait: a request that waited for the lock would not be
    # answered until it was released, and the lock is released only once the request is answered.
    store = await SqliteStore.open(store_path(tmp_path), busy_timeout_ms=600_000)
    try:
        clock = Clock()
        ring = await open_keyring(tmp_path, store, clock)
        rec, token = await issue_key(store, ring.pepper, tier="user", owner="alice", now=T0)
        await ring.rotate_pepper()
        clock.now = T0 + 6
        await ring.refresh()
        assert ring.pepper.version == 2 and rec.pepper_version == 1
        other = sqlite3.connect(store.path, isolation_level=None)   # another process's, say the CLI's
        try:
            other.execute("BEGIN IMMEDIATE")                          # holds the write lock
            answer = asyncio.create_task(authenticate(token, store, ring.pepper, "10.0.0.1", clock.now))
            done, _ = await asyncio.wait({answer}, timeout=60)       # a watchdog, not a measurement
            assert answer in done and other.in_transaction, "the request waited for the write lock"
            assert answer.result().key_id == rec.key_id
            await asyncio.wait_for(rehashes_settled(), 60)            # gave up at once, lock still held
            assert (await store.get_key(rec.key_id)).pepper_version == 1  # type: ignore[union-attr]
        finally:
            other.execute("ROLLBACK")
            other.close()
        # Released: the key's next use re-hashes it.
        await authenticate(token, store, ring.pepper, "10.0.0.1", clock.now)
        await rehashes_settled()
        after = await store.get_key(rec.key_id)
        assert after is not None and after.pepper_version == 2 and after.secret_hash != rec.secret_hash
        await authenticate(token, store, ring.pepper, "10.0.0.1", clock.now)   # and verifies under the new one
    finally:
        await store.close()


def test_cli_crypto_commands_print_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str) -> dict[str, Any]:
        assert main(["--data-dir", str(tmp_path), "crypto", *args]) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1
        return json.loads(out)
    before = run("status")
    assert before["provider"] == "file" and before["pepper"]["versions"] == [1]
    dek = run("rotate-dek")
    assert dek["dek_id"] != before["dek"]["current"] and dek["reencrypted"] == 2
    root = run("rotate-root")
    assert root["root"] != before["root"]["key_id"] and root["pending_rewrap"] == 0
    kid = run("rotate-jwt")
    assert kid["kid"] != before["jwt"]["active_kid"] and len(kid["verifying"]) == 2
    assert run("rotate-pepper")["pepper_version"] == 2
    after = run("status")
    assert after["root"]["key_id"] == root["root"] and after["dek"]["current"] == dek["dek_id"]
    assert after["jwt"]["active_kid"] == kid["kid"] and after["pepper"]["versions"] == [1, 2]
    assert [k["dek_id"] for k in after["dek"]["keys"]] == [dek["dek_id"]]


# ------------------------------------------------------------------ end to end, under load


class Load:
    """A thread sending requests with each credential in turn until stopped, counting failures.

    `credentials` (name -> key or session token) may grow while it runs: a rotation's successor joins.
    """

    def __init__(self, gw: Gateway, credentials: dict[str, str]) -> None:
        self.gw, self.credentials = gw, credentials
        self.ok = 0
        self.ok_by_name: dict[str, int] = {}
        self.failures: list[tuple[str, int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, credential in list(self.credentials.items()):
                status, _, body = call(self.gw.url + "/v2/models/deepseek", key=credential)
                if status == 200:
                    self.ok += 1
                    self.ok_by_name[name] = self.ok_by_name.get(name, 0) + 1
                else:
                    self.failures.append((name, status, body))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def wait_more(self, n: int = 10) -> None:
        target = self.ok + n
        assert wait_for(lambda: self.ok >= target or bool(self.failures), 60)


@pytest.fixture(scope="module")
def gw(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-rotation"), triton.http_url, free_ports(3),
                **{"crypto.refresh_interval_s": 0.2}).start()
    yield g
    g.stop()


def secrets_now(gw: Gateway) -> dict[str, bytes]:
    """Every secret the store holds, plus the DEKs and roots, in the clear: what must never be on disk."""
    async def go() -> dict[str, bytes]:
        store = await SqliteStore.open(store_path(gw.data_dir))
        try:
            rows = await SqliteSecretRows.open(store)
            kek = FileKek.load_or_create(gw.data_dir)
            env = Envelope(rows, kek)
            found = {name: await env.get(name) or b"" for name, _ in await env.listing("")}
            for dek_id, kek_id, _, _ in await rows.list_deks():
                wrapped = await rows.get_dek(dek_id)
                assert wrapped is not None
                found["dek:" + dek_id] = kek.unwrap(wrapped[1], kek_id)
            for path in (gw.data_dir / "secrets").glob("root*.key"):
                found["root:" + path.name] = path.read_bytes()
            return found
        finally:
            await store.close()
    return asyncio.run(go())


def test_every_rotation_under_steady_load_fails_no_request(gw: Gateway) -> None:
    key_id, key = gw.key(owner="alice", roles=("user",))
    status, _, body = call(gw.url + "/v1/sessions", "POST", b"", key=key)
    assert status == 200
    old_session = json.loads(body)["token"]
    old_kid = jwt.get_unverified_header(old_session)["kid"]
    seen: dict[str, bytes] = secrets_now(gw)

    def rotate(action: str) -> dict[str, Any]:
        result = asyncio.run(run_crypto(action, gw.settings))
        seen.update(secrets_now(gw))
        return result

    _, admin = gw.key(owner="ops", roles=("admin",))
    with Load(gw, {"key": key, "session": old_session}) as load:
        load.wait_more()
        dek = rotate("rotate-dek")
        load.wait_more()
        root = rotate("rotate-root")
        load.wait_more()
        jwt_rot = rotate("rotate-jwt")

        def minted_kid() -> str:
            status, _, body = call(gw.url + "/v1/sessions", "POST", b"", key=key)
            assert status == 200
            return str(jwt.get_unverified_header(json.loads(body)["token"])["kid"])
        # New tokens carry the new kid once the server has reloaded; the old token keeps working.
        assert wait_for(lambda: minted_kid() == jwt_rot["kid"], 30)
        load.wait_more()
        rotate("rotate-pepper")

        def rehashed() -> bool:
            return asyncio.run(_pepper_version(gw, key_id)) == 2
        # Re-hashed on a successful use once every process holds the new pepper.
        assert wait_for(rehashed, 30)
        load.wait_more()
        # Key rotation with a grace: the successor joins the load, the old key keeps working.
        status, _, body = call(gw.url + f"/admin/v1/keys/{key_id}/rotate", "POST", {"grace": "24h"}, admin)
        assert status == 201, body
        successor = json.loads(body)
        old_key_uses = load.ok_by_name["key"]
        load.credentials["successor"] = successor["key"]
        load.wait_more(20)
    assert load.failures == [] and load.ok >= 70   # each wait_more saw 10 (the last 20) more successes
    assert load.ok_by_name.get("successor", 0) > 0 and load.ok_by_name["key"] > old_key_uses

    # The grace ends: the old key (and the session it minted) is refused, the successor is not.
    gw.end_grace(key_id)
    expected_401 = call(gw.url + "/v2/models/deepseek")[2]
    with Load(gw, {"successor": successor["key"]}) as after:
        for credential in (key, old_session):
            assert call(gw.url + "/v2/models/deepseek", key=credential)[::2] == (401, expected_401)
        after.wait_more()
    assert after.failures == [] and after.ok >= 10
    status = asyncio.run(run_crypto("status", gw.settings))
    assert status["dek"]["current"] == dek["dek_id"] and status["dek"]["rows_not_reencrypted"] == 0
    assert status["root"]["key_id"] == root["root"] and status["root"]["deks_not_rewrapped"] == 0
    assert status["jwt"]["active_kid"] == jwt_rot["kid"] and old_kid in status["jwt"]["kids"]
    assert status["pepper"]["current_version"] == 2

    # Nothing secret in the clear on disk: not in the key store, not in the audit log.
    seen.update(secrets_now(gw))
    assert any(k.startswith(PEPPER_PREFIX) for k in seen) and any(k.startswith("dek:") for k in seen)
    assert len([k for k in seen if k.startswith("root:")]) == 2
    assert audit_records(gw)
    disk = b"".join(p.read_bytes() for p in gw.data_dir.rglob("*")
                    if p.is_file() and "secrets" not in p.parts)   # secrets/: only the file root, by design
    for name, value in seen.items():
        assert len(value) >= 32, name
        assert value not in disk and value.hex().encode() not in disk, name
    for credential in (key, old_session):
        assert credential.encode() not in disk


def test_a_running_server_rotates_its_data_key_on_schedule_and_audits_each_rotation(
        triton: TritonProcess, tmp_path: Path) -> None:
    """Keyring.run inside a real server, with a schedule of one second instead of 30 days."""
    g = Gateway(tmp_path, triton.http_url, free_ports(3),
                **{"crypto.dek_rotation_days": 1.0 / DAY_S, "crypto.refresh_interval_s": 0.2}).start()
    try:
        _, key = g.key()

        def scheduled() -> list[dict[str, Any]]:
            return [r for r in audit_records(g) if r.get("admin", {}).get("action") == "crypto.scheduled-rotate-dek"]
        assert wait_for(lambda: len(scheduled()) >= 2, 30), scheduled()
        assert call(g.url + "/v2/models/deepseek", key=key)[0] == 200
    finally:
        g.stop()
    records = scheduled()
    # One record per rotation, each taking over from the one before: none missed, none doubled.
    changes = [(r["admin"]["before"]["dek"], r["admin"]["after"]["dek"]) for r in records]
    assert all(old != new for old, new in changes)
    assert [new for _, new in changes[:-1]] == [old for old, _ in changes[1:]]
    assert {(r["actor"], r["resource"], r["status"]) for r in records} == {("seekgate", "admin:crypto", "allowed")}
    current = asyncio.run(run_crypto("status", g.settings))["dek"]["current"]
    assert current == changes[-1][1]


async def _pepper_version(gw: Gateway, key_id: str) -> int:
    store = await SqliteStore.open(store_path(gw.data_dir))
    try:
        rec = await store.get_key(key_id)
        assert rec is not None
        return rec.pepper_version
    finally:
        await store.close()


def _start_refused(tmp_path: Path, break_root: Callable[[Path], None]) -> BaseException | None:
    """A server whose data dir held a DEK wrapped by its root, started again once `break_root(secrets)` ran:
    the error its start ended with (never ready, never listening)."""
    first = Gateway(tmp_path, "http://127.0.0.1:9", free_ports(3))
    first.key()   # the store now holds a DEK wrapped by this data dir's root
    break_root(first.data_dir / "secrets")
    second = Gateway(tmp_path, "http://127.0.0.1:9", free_ports(3))
    try:
        second.start()
    except Exception:
        pass
    assert second._thread is not None
    second._thread.join(30)
    return second.error


def test_a_server_with_the_wrong_root_refuses_to_start_and_says_why(tmp_path: Path) -> None:
    from proxy.keys.envelope import EnvelopeError
    error = _start_refused(tmp_path, lambda secrets: (secrets / "root.key").write_bytes(bytes(32)))
    assert isinstance(error, EnvelopeError)
    assert "wrapped by root" in str(error) and "\n" not in str(error)


def test_a_server_whose_root_file_is_gone_refuses_to_start_and_names_the_file(tmp_path: Path) -> None:
    from proxy.keys.kek import KekError
    gone: list[str] = []

    def remove_root(secrets: Path) -> None:
        gone.append(FileKek.load_or_create(secrets.parent).key_id)
        (secrets / "root.key").unlink()
    error = _start_refused(tmp_path, remove_root)
    root_file = tmp_path / "data" / "secrets" / "root.key"
    assert isinstance(error, KekError)
    assert str(error) == (f"root key missing: {root_file}; the store's DEKs are wrapped by root {gone[0]} "
                          "(restore the root file from its backup)")
    assert not root_file.exists()   # no new root that would unwrap nothing
