"""Tests for proxy.key_cache: every invalidation path, the bound on size, and the store-down behaviour."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tritonclient.grpc import service_pb2_grpc

from proxy.context import Principal
from proxy.errors import StoreUnavailable, Unauthenticated
from proxy.keys.cache import KeyCache
from proxy.keys.sessions import SessionAuthority
from proxy.local.triton import TritonProcess
from proxy.paths import store_path
from proxy.settings import AuthSettings
from proxy.steps.authn import authenticate
from proxy.store import KeyRecord
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_secrets import SqliteSecretRows
from tests.conftest import free_ports
from tests.frontend.test_grpc import assert_nothing_forwarded, code_of, infer_request, md, quiet
from tests.frontend.test_http import call
from tests.gateway import Gateway
from tests.relay import TcpRelay
from tests.steps.test_authn import IP, NOW, PEPPER, issue

TTL = 5.0


class Counting:
    """The real store, counting chain reads: a cache hit must not read the chain."""

    def __init__(self, store: SqliteStore) -> None:
        self.store, self.chains = store, 0

    async def get_chain(self, key_id: str) -> list[KeyRecord]:
        self.chains += 1
        return await self.store.get_chain(key_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest_asyncio.fixture(loop_scope="function")
async def store(tmp_path: Path) -> AsyncIterator[Counting]:
    s = await SqliteStore.open(tmp_path / "keys.db", busy_timeout_ms=50)
    yield Counting(s)
    await s.close()


def cache(**kw: Any) -> KeyCache:
    return KeyCache(**{"size": 100, "ttl_s": TTL, **kw})


async def auth(token: str, store: Any, c: KeyCache, *, now: float = NOW, ip: str = IP,
               sessions: SessionAuthority | None = None) -> Principal:
    return await authenticate(token, store, PEPPER, ip, now, sessions, c)


async def reason(token: str, store: Any, c: KeyCache, **kw: Any) -> str:
    with pytest.raises(Unauthenticated) as err:
        await auth(token, store, c, **kw)
    return err.value.reason


# --- hits -----------------------------------------------------------------------

async def test_a_verified_key_is_served_from_the_cache(store: Counting) -> None:
    key_id, token = await issue(store.store)
    c = cache()
    first = await auth(token, store, c)
    assert await auth(token, store, c, now=NOW + 1) == first and first.key_id == key_id
    assert store.chains == 1 and len(c) == 1


async def test_the_plaintext_token_is_not_a_cache_key(store: Counting) -> None:
    _, token = await issue(store.store)
    c = cache()
    await auth(token, store, c)
    assert all(token.encode() not in k and k != token for k in c._entries)
    # Another process's digests differ: the MAC key is per process.
    assert cache().digest(token) != c.digest(token)


async def test_refusals_are_not_cached(store: Counting) -> None:
    key_id, token = await issue(store.store)
    c = cache()
    wrong = token[:-10] + ("A" if token[-10] != "A" else "B") + token[-9:]
    for _ in range(2):
        assert await reason(wrong, store, c) in ("bad_checksum", "hash_mismatch")
    assert len(c) == 0


async def test_ip_binding_is_checked_on_every_hit(store: Counting) -> None:
    _, token = await issue(store.store, allowed_cidrs=("10.0.0.0/8",))
    c = cache()
    await auth(token, store, c, ip="10.1.1.1")
    assert await reason(token, store, c, ip="11.1.1.1") == "ip_not_allowed"
    assert (await auth(token, store, c, ip="10.2.2.2")).tier == "app"
    assert store.chains == 1


class SlowRevision(Counting):
    """Counts revision reads, each taking 20 ms: the others of a burst arrive while one is under way."""

    def __init__(self, store: SqliteStore) -> None:
        super().__init__(store)
        self.revisions = 0

    async def revision(self) -> int:
        self.revisions += 1
        await asyncio.sleep(0.02)
        return await self.store.revision()


async def test_a_burst_shares_one_revision_read(store: Counting) -> None:
    _, token = await issue(store.store)
    slow = SlowRevision(store.store)
    c = cache(revision_check_ms=1000)
    await auth(token, slow, c)
    assert slow.revisions == 1
    burst = await asyncio.gather(*(auth(token, slow, c, now=NOW + 2) for _ in range(16)))   # the check is due
    assert slow.revisions == 2 and {p.key_id for p in burst} == {burst[0].key_id}
    # revision_check_ms 0 reads on every request, as it says.
    every = cache(revision_check_ms=0)
    await asyncio.gather(*(auth(token, slow, every) for _ in range(8)))
    assert slow.revisions == 2 + 8


async def test_a_request_after_a_change_does_not_share_a_read_begun_before_it(store: Counting) -> None:
    _, token = await issue(store.store)
    other_id, other = await issue(store.store)
    slow = SlowRevision(store.store)
    c = cache(revision_check_ms=1000)
    await auth(token, slow, c)
    await auth(other, slow, c)
    reading = asyncio.ensure_future(auth(token, slow, c, now=NOW + 2))
    await asyncio.sleep(0.005)   # its read is under way
    await store.store.revoke_key(other_id, NOW)   # moves the change signal
    assert await reason(other, slow, c, now=NOW + 2) == "revoked"
    assert (await reading).tier == "app" and slow.revisions == 3



class SlowChain(Counting):
    """Chain reads that take 20 ms, or fail after them: the others of a burst arrive while one is under way."""

    def __init__(self, store: SqliteStore, fail: bool = False) -> None:
        super().__init__(store)
        self.fail = fail

    async def get_chain(self, key_id: str) -> list[KeyRecord]:
        self.chains += 1
        await asyncio.sleep(0.02)
        if self.fail:
            raise StoreUnavailable("store_unavailable: get_chain: locked")
        return await self.store.get_chain(key_id)


async def test_a_burst_of_misses_shares_one_chain_read(store: Counting) -> None:
    key_id, token = await issue(store.store)
    slow = SlowChain(store.store)
    c = cache()
    burst = await asyncio.gather(*(auth(token, slow, c) for _ in range(16)))
    assert slow.chains == 1 and {p.key_id for p in burst} == {key_id} and len(c) == 1
    # Each request still gets its own checks: a wrong secret for the same key id is refused.
    wrong = token[:-10] + ("A" if token[-10] != "A" else "B") + token[-9:]
    c.clear()
    answers = await asyncio.gather(auth(token, slow, c), reason(wrong, slow, c), return_exceptions=True)
    assert isinstance(answers[0], Principal) and answers[1] in ("bad_checksum", "hash_mismatch")


async def test_a_miss_after_a_change_does_not_share_a_chain_read_begun_before_it(store: Counting) -> None:
    key_id, token = await issue(store.store)
    slow = SlowChain(store.store)
    c = cache()
    reading = asyncio.ensure_future(auth(token, slow, c))
    await asyncio.sleep(0.005)   # its chain read is under way
    await store.store.revoke_key(key_id, NOW)   # moves the change signal
    assert await reason(token, slow, c) == "revoked"
    assert slow.chains == 2   # its own read, not the one begun before the change
    with pytest.raises(Unauthenticated, match="revoked"):
        await reading   # (this test store reads only after its 20 ms, so the first read sees it too)


async def test_a_failed_shared_chain_read_fails_every_request_that_shared_it(store: Counting) -> None:
    _, token = await issue(store.store)
    failing = SlowChain(store.store, fail=True)
    c = cache()
    answers = await asyncio.gather(*(auth(token, failing, c) for _ in range(8)), return_exceptions=True)
    assert all(isinstance(a, StoreUnavailable) for a in answers), answers
    assert failing.chains == 1 and len(c) == 0
    # Nothing of the failed read lingers: the next miss reads again.
    failing.fail = False
    assert (await auth(token, failing, c)).tier == "app" and failing.chains == 2


async def test_a_cancelled_request_does_not_cancel_the_chain_read_it_began(store: Counting) -> None:
    key_id, token = await issue(store.store)
    slow = SlowChain(store.store)
    c = cache()
    first = asyncio.ensure_future(auth(token, slow, c))
    await asyncio.sleep(0.005)
    second = asyncio.ensure_future(auth(token, slow, c))
    await asyncio.sleep(0.005)
    first.cancel()
    assert (await second).key_id == key_id and slow.chains == 1
    with pytest.raises(asyncio.CancelledError):
        await first


# --- invalidation ------------------------------------------------------------------

async def test_revoking_the_key_counts_on_the_next_request(store: Counting) -> None:
    key_id, token = await issue(store.store)
    c = cache()
    await auth(token, store, c)
    await store.store.revoke_key(key_id, NOW)
    assert await reason(token, store, c) == "revoked"


async def test_revoking_an_ancestor_elsewhere_counts_on_the_next_request(store: Counting, tmp_path: Path) -> None:
    app_id, _ = await issue(store.store)
    _, token = await issue(store.store, tier="device", parent=app_id)
    c = cache()
    await auth(token, store, c)
    async with await SqliteStore.open(tmp_path / "keys.db") as other:   # as the CLI would
        await other.revoke_key(app_id, NOW)
    assert await reason(token, store, c) == "revoked"


async def test_an_unrelated_change_only_costs_a_reread(store: Counting) -> None:
    _, token = await issue(store.store)
    c = cache()
    await auth(token, store, c)
    await issue(store.store)
    assert (await auth(token, store, c)).tier == "app"
    assert store.chains == 2


@pytest.mark.parametrize("whose", ["key", "ancestor"])
async def test_an_entry_never_outlives_an_expiry_in_the_chain(store: Counting, whose: str) -> None:
    app_id, _ = await issue(store.store, expires_at=NOW + 2 if whose == "ancestor" else None)
    _, token = await issue(store.store, tier="device", parent=app_id,
                           expires_at=NOW + 2 if whose == "key" else None)
    c = cache()
    await auth(token, store, c)
    await auth(token, store, c, now=NOW + 1.9)
    assert store.chains == 1
    assert await reason(token, store, c, now=NOW + 2) == ("expired" if whose == "key" else "revoked")


async def test_the_ttl_bounds_an_entry(store: Counting) -> None:
    key_id, token = await issue(store.store)
    c = cache()
    await auth(token, store, c)
    # A change that bumps no revision (a hand edit): only the TTL catches it.
    with sqlite3.connect(store.store.path) as raw:
        raw.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ?", (NOW, key_id))
    assert (await auth(token, store, c, now=NOW + TTL - 0.1)).key_id == key_id
    assert await reason(token, store, c, now=NOW + TTL) == "revoked"


async def test_a_foreign_revocation_counts_on_the_next_request_without_a_revision_query(
        store: Counting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_id, token = await issue(store.store)
    c = cache(revision_check_ms=60_000)
    queries = {"n": 0}
    real = store.store.revision

    async def counted() -> int:
        queries["n"] += 1
        return await real()
    monkeypatch.setattr(store.store, "revision", counted)
    await auth(token, store, c)
    for i in range(5):   # the change signal is still: no revision query, no chain read
        await auth(token, store, c, now=NOW + i)
    assert queries["n"] == 1 and store.chains == 1
    async with await SqliteStore.open(tmp_path / "keys.db") as other:   # the CLI, another worker
        await other.revoke_key(key_id, NOW)
    assert await reason(token, store, c, now=NOW + 5) == "revoked"   # the very next request
    assert queries["n"] == 2


async def test_an_unsignalled_change_is_caught_by_the_revision_interval(store: Counting, tmp_path: Path) -> None:
    """A writer that died between its commit and the signal: the periodic revision read bounds the delay."""
    key_id, token = await issue(store.store)
    c = cache(revision_check_ms=500)
    await auth(token, store, c)
    with sqlite3.connect(tmp_path / "keys.db") as raw:   # commits, but never touches the signal
        raw.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ?", (NOW, key_id))
        raw.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
    assert (await auth(token, store, c, now=NOW + 0.4)).key_id == key_id   # within the documented bound
    assert await reason(token, store, c, now=NOW + 0.5) == "revoked"


async def test_a_verification_raced_by_a_revocation_is_not_kept(store: Counting) -> None:
    key_id, token = await issue(store.store)
    c = cache()
    _, rev = await c.lookup(token, store, NOW)
    chain = await store.get_chain(key_id)
    await store.store.revoke_key(key_id, NOW)
    await c.revision(store, NOW)   # another request noticed the revocation meanwhile
    c.put(token, rev, chain, Principal(key_id=key_id, tier="app", owner="x"), NOW)
    assert len(c) == 0


# --- bounds and settings ----------------------------------------------------------------

async def test_size_is_bounded_least_recently_used_first(store: Counting) -> None:
    c = cache(size=3)
    tokens = [(await issue(store.store))[1] for _ in range(5)]
    for t in tokens[:3]:
        await auth(t, store, c)
    await auth(tokens[0], store, c)          # touch: now the most recent
    for t in tokens[3:]:
        await auth(t, store, c)
    assert len(c) == 3
    before = store.chains
    await auth(tokens[0], store, c)
    assert store.chains == before            # kept
    await auth(tokens[1], store, c)
    assert store.chains == before + 1        # evicted


@pytest.mark.parametrize("kw", [{"size": 0}, {"ttl_s": 0}])
async def test_zero_size_or_ttl_disables_the_cache(store: Counting, kw: dict[str, float]) -> None:
    _, token = await issue(store.store)
    c = cache(**kw)
    await auth(token, store, c)
    await auth(token, store, c)
    assert store.chains == 2 and len(c) == 0


def test_built_from_settings() -> None:
    c = KeyCache.from_settings(AuthSettings())
    assert (c.size, c.ttl_s, c._check_s) == (10000, 5.0, 1.0)


# --- store down -----------------------------------------------------------------------

async def test_a_cached_key_survives_a_closed_store_within_its_ttl(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "keys.db")
    _, cached = await issue(s)
    _, uncached = await issue(s)
    c = cache()
    await auth(cached, s, c)
    await s.close()
    assert (await auth(cached, s, c, now=NOW + 1)).tier == "app"
    with pytest.raises(StoreUnavailable):
        await auth(uncached, s, c, now=NOW + 1)
    with pytest.raises(StoreUnavailable):
        await auth(cached, s, c, now=NOW + TTL)


async def test_a_cached_key_survives_a_locked_store(store: Counting) -> None:
    _, cached = await issue(store.store)
    _, uncached = await issue(store.store)
    c = cache()
    await auth(cached, store, c)

    async def locked(*_: Any) -> Any:
        # What _guard makes of sqlite3.OperationalError("database is locked") after busy_timeout.
        raise StoreUnavailable("store_unavailable: database is locked")
    # A WAL reader cannot be locked out by another connection, so the lock is simulated here.
    store.revision = store.get_chain = locked   # type: ignore[method-assign]
    assert (await auth(cached, store, c, now=NOW + 1)).tier == "app"
    with pytest.raises(StoreUnavailable):
        await auth(uncached, store, c, now=NOW + 1)
    del store.revision, store.get_chain          # unlocked: the real store again
    assert (await auth(uncached, store, c, now=NOW + 1)).tier == "app"


async def test_a_change_that_cannot_be_read_ends_every_entry(store: Counting, tmp_path: Path) -> None:
    """A revocation signalled by another process while this one's reads fail (a pool exhausted, queries
    timing out): the signal moved, the revision read failed, so no cached entry serves its TTL out."""
    key_id, token = await issue(store.store)
    c = cache(revision_check_ms=60_000)
    await auth(token, store, c)
    async with await SqliteStore.open(tmp_path / "keys.db") as other:   # the CLI, another worker
        await other.revoke_key(key_id, NOW)

    async def timing_out(*_: Any) -> Any:
        raise StoreUnavailable("store_unavailable: revision: timed out")
    store.revision = store.get_chain = timing_out   # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):   # not served from the cache: the change may be this revocation
        await auth(token, store, c, now=NOW + 1)
    del store.revision, store.get_chain   # the store answers again
    assert await reason(token, store, c, now=NOW + 1) == "revoked"


# --- session tokens -------------------------------------------------------------------------

KID = "00112233445566aa"


@pytest_asyncio.fixture(loop_scope="function")
async def sessions(store: Counting) -> tuple[SessionAuthority, SqliteSecretRows]:
    rows = await SqliteSecretRows.open(store.store)
    return SessionAuthority({KID: Ed25519PrivateKey.generate()}, KID, issuer="seekgate",
                            audience="seekgate", ttl_s=60, revocations=rows), rows


async def session_token(store: Counting, authority: SessionAuthority, **kw: Any) -> tuple[str, str, str]:
    user_id, key = await issue(store.store, tier="user", roles=("user",), **kw)
    parent = await authenticate(key, store.store, PEPPER, IP, NOW)
    minted = authority.mint(parent, NOW)
    return user_id, minted.jti, minted.token


async def test_a_verified_session_is_cached_until_revoked_by_jti(
        store: Counting, sessions: tuple[SessionAuthority, SqliteSecretRows]) -> None:
    authority, rows = sessions
    _, jti, token = await session_token(store, authority)
    c = cache()
    p = await auth(token, store, c, sessions=authority)
    assert await auth(token, store, c, sessions=authority, now=NOW + 1) == p and p.key_id == jti
    assert store.chains == 1
    await rows.revoke_session(jti, NOW)
    assert await reason(token, store, c, sessions=authority, now=NOW + 1) == "session_revoked"


async def test_a_cached_session_ends_with_its_parent_and_its_exp(
        store: Counting, sessions: tuple[SessionAuthority, SqliteSecretRows]) -> None:
    authority, _ = sessions
    parent_id, _, token = await session_token(store, authority)
    c = cache(ttl_s=120)
    await auth(token, store, c, sessions=authority)
    await auth(token, store, c, sessions=authority, now=NOW + 59)
    assert store.chains == 1
    assert await reason(token, store, c, sessions=authority, now=NOW + 60) == "session_expired"
    _, _, other = await session_token(store, authority)
    await auth(other, store, c, sessions=authority)
    await store.store.revoke_key((await auth(other, store, c, sessions=authority)).parents[0], NOW)
    assert await reason(other, store, c, sessions=authority) == "revoked"


# --- end to end: another process revokes through the CLI -------------------------------------

@pytest.fixture(scope="module")
def gw(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-key-cache"), triton.http_url, free_ports(3)).start()
    yield g
    g.stop()


def test_a_revocation_by_the_cli_in_another_process_counts_on_the_next_request(gw: Gateway) -> None:
    key_id, key = gw.key(owner="carol", roles=("user",))
    for _ in range(3):   # verified once, then served from the cache
        assert call(gw.url + "/v2/models/deepseek", key=key)[0] == 200
    done = subprocess.run([sys.executable, "-m", "proxy", "--data-dir", str(gw.data_dir), "keys", "revoke", key_id],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert call(gw.url + "/v2/models/deepseek", key=key)[0] == 401


# --- end to end: the store locked by another process, through both fronts --------------------

class StoreLock:
    """Another process holding the locks a WAL reader of the key store must take.

    In WAL mode no SQL statement of another connection (BEGIN EXCLUSIVE included) keeps a reader
    out, so this holds SQLite's own reader locks: every byte of the WAL-index lock region
    (offsets 120-127 of the -shm file: write, checkpoint, recover and the five read marks). A
    reader then retries for about 10 s and fails ("locking protocol"), as it would behind a
    process stuck in recovery. A separate process, since POSIX locks never conflict within one.
    """

    def __init__(self, db: Path) -> None:
        self._holder = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, os, sys\n"
             "shm = open(sys.argv[1] + '-shm', 'r+b')\n"
             "fcntl.lockf(shm, fcntl.LOCK_EX | fcntl.LOCK_NB, 8, 120, os.SEEK_SET)\n"
             "print('held', flush=True)\n"
             "sys.stdin.read()\n", str(db)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._holder.stdout is not None and self._holder.stdout.readline() == "held\n"

    def release(self) -> None:
        assert self._holder.stdin is not None
        self._holder.stdin.close()
        assert self._holder.wait(10) == 0


def test_a_locked_store_refuses_cold_keys_with_503_and_unavailable_and_serves_cached_ones(
        triton: TritonProcess, tmp_path: Path) -> None:
    http_relay = TcpRelay("127.0.0.1", triton.launch.http_port).start()
    grpc_relay = TcpRelay("127.0.0.1", triton.launch.grpc_port).start()
    # A TTL and a revision backstop longer than the test: the cached key never needs the store.
    g = Gateway(tmp_path, f"http://127.0.0.1:{http_relay.port}", free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{grpc_relay.port}", "auth.key_cache_ttl_s": 600,
                   "auth.key_cache_revision_check_ms": 600_000}).start()
    lock: StoreLock | None = None
    try:
        _, cached = g.key(owner="cached", roles=("user",))
        _, cold = g.key(owner="cold", roles=("user",))
        generate = g.url + "/v2/models/deepseek/generate"
        assert call(generate, "POST", {"text_input": "warm", "max_tokens": 2}, cached)[0] == 200
        lock = StoreLock(store_path(g.data_dir))
        http_relay.clear()
        status, headers, _ = call(generate, "POST", {"text_input": "cold-over-http", "max_tokens": 2}, cold)
        assert status == 503 and int(headers["Retry-After"]) >= 1
        with grpc.insecure_channel(f"127.0.0.1:{g.settings.server.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            quiet(grpc_relay)
            assert code_of(lambda: stub.ModelInfer(infer_request("deepseek", "cold-over-grpc"),
                                                   metadata=md(cold))) == grpc.StatusCode.UNAVAILABLE
            assert_nothing_forwarded(grpc_relay)
        assert b"cold-over-http" not in http_relay.seen()
        assert call(generate, "POST", {"text_input": "cached", "max_tokens": 2}, cached)[0] == 200
        lock.release()
        lock = None
        assert call(generate, "POST", {"text_input": "cold again", "max_tokens": 2}, cold)[0] == 200
    finally:
        if lock is not None:
            lock.release()
        g.stop()
        http_relay.stop()
        grpc_relay.stop()
