"""Tests for proxy.authn: bearer parsing and every refusal reason, over a real SQLite store."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from proxy.context import Principal
from proxy.errors import StoreUnavailable, Unauthenticated
from proxy.keys import generate_key, hash_secret, key_prefix_and_last4
from proxy.keys.format import _checksum
from proxy.steps.authn import authenticate, parse_bearer
from proxy.store import KeyRecord
from proxy.store.sqlite import SqliteStore

PEPPER = b"k" * 32
NOW = 1_700_000_000.0
IP = "203.0.113.7"


@pytest_asyncio.fixture(loop_scope="function")
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "keys.db")
    yield s
    await s.close()


async def issue(store: SqliteStore, *, tier: str = "app", parent: str | None = None,
                **fields: Any) -> tuple[str, str]:
    key_id, token = generate_key()
    prefix, last4 = key_prefix_and_last4(token)
    await store.create_key(KeyRecord(
        key_id=key_id, secret_hash=hash_secret(PEPPER, token), tier=tier,
        owner=fields.pop("owner", "team-a"), parent_id=parent, prefix=prefix, last4=last4,
        created_at=fields.pop("created_at", NOW - 100), **fields))
    return key_id, token


async def reason_for(token: str, store: Any, ip: str = IP, now: float = NOW,
                     pepper: bytes = PEPPER) -> str:
    with pytest.raises(Unauthenticated) as err:
        await authenticate(token, store, pepper, ip, now)
    return err.value.reason


class CountingStore:
    """The one store double: proves format checks happen before any lookup."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return None if name == "get_key" else []
        return call


# --- parse_bearer -----------------------------------------------------------

@pytest.mark.parametrize("header,token", [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER a.b-c_d~e+f/g==", "a.b-c_d~e+f/g=="),
])
def test_parse_bearer_accepts(header: str, token: str) -> None:
    assert parse_bearer(header) == token


@pytest.mark.parametrize("header", [None, ""])
def test_parse_bearer_missing(header: str | None) -> None:
    with pytest.raises(Unauthenticated) as err:
        parse_bearer(header)
    assert err.value.reason == "missing_credentials"


@pytest.mark.parametrize("header", [
    "Bearer", "Bearer ", "Bearer  abc", " Bearer abc", "Bearer abc ", "Bearer abc def",
    "Basic dXNlcjpwYXNz", "Bearerabc", "Bearer\tabc", "Bearer abc\n", "Bearer ab=c",
    "Bearer " + "a" * 5000, "Bearer ābc", "abc",
])
def test_parse_bearer_rejects_garbage(header: str) -> None:
    with pytest.raises(Unauthenticated) as err:
        parse_bearer(header)
    assert err.value.reason == "malformed"


# --- authenticate: success ----------------------------------------------------

async def test_valid_key_becomes_a_principal(store: SqliteStore) -> None:
    app_id, _ = await issue(store, models=("deepseek", "other"))
    dev_id, token = await issue(store, tier="device", parent=app_id, owner="sensor-1",
                                roles=("infer",), labels={"site": "lab"},
                                models=("deepseek",), expires_at=NOW + 60)
    principal = await authenticate(token, store, PEPPER, IP, NOW)
    assert principal == Principal(key_id=dev_id, tier="device", owner="sensor-1",
                                  roles=("infer",), labels={"site": "lab"},
                                  models=("deepseek",), parents=(app_id,),
                                  limits=((dev_id, "device", {}), (app_id, "app", {})))


async def test_child_inherits_parent_model_limit(store: SqliteStore) -> None:
    app_id, _ = await issue(store, models=("deepseek",))
    _, token = await issue(store, tier="device", parent=app_id)
    assert (await authenticate(token, store, PEPPER, IP, NOW)).models == ("deepseek",)


async def test_child_models_outside_parent_are_refused(store: SqliteStore) -> None:
    app_id, _ = await issue(store, models=("deepseek",))
    _, token = await issue(store, tier="device", parent=app_id, models=("other",))
    assert await reason_for(token, store) == "models_outside_parent"


# --- authenticate: refusals ---------------------------------------------------

async def test_format_failures_never_reach_the_store() -> None:
    counting = CountingStore()
    _, token = generate_key()
    typo = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    assert await reason_for(typo, counting) == "bad_checksum"
    assert await reason_for("sgk_nope", counting) == "malformed"
    assert await reason_for("eyJhbGciOi.x.y", counting) == "malformed"  # JWTs: later issue
    assert counting.calls == 0
    assert await reason_for(token, counting) == "unknown_key"
    assert counting.calls == 1


# Every position the checksum covers: the key id, the secret and the check itself ("sgk_" and the
# separators are fixed by the format). Each typo stays inside its field's alphabet, so only the
# checksum can tell; a fixed token, so every run checks the same cases.
_KEY_ID, _SECRET = "abcdefgh2345", "Sx" * 21 + "q"
_BODY = f"sgk_{_KEY_ID}_{_SECRET}_"
FIXED_TOKEN = _BODY + _checksum(_BODY)
_FIELDS = [(range(4, 16), "abcdefghijklmnopqrstuvwxyz234567"),
           (range(17, 60), "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"),
           (range(61, 67), "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")]
CHECKED_POSITIONS = [(pos, alphabet) for positions, alphabet in _FIELDS for pos in positions]


def typo_at(token: str, pos: int, alphabet: str) -> str:
    """`token` with the character at `pos` replaced by the next one of its field's alphabet."""
    return token[:pos] + alphabet[(alphabet.index(token[pos]) + 1) % len(alphabet)] + token[pos + 1:]


async def test_the_fixed_token_is_well_formed() -> None:
    counting = CountingStore()
    assert len(FIXED_TOKEN) == 67
    assert await reason_for(FIXED_TOKEN, counting) == "unknown_key" and counting.calls == 1


@pytest.mark.parametrize("pos,alphabet", CHECKED_POSITIONS, ids=[str(p) for p, _ in CHECKED_POSITIONS])
async def test_a_typo_at_any_checksummed_position_is_bad_checksum_without_a_lookup(pos: int, alphabet: str) -> None:
    counting = CountingStore()
    assert await reason_for(typo_at(FIXED_TOKEN, pos, alphabet), counting) == "bad_checksum"
    assert counting.calls == 0


async def test_unknown_key(store: SqliteStore) -> None:
    _, token = generate_key()
    assert await reason_for(token, store) == "unknown_key"


async def test_hash_mismatch(store: SqliteStore) -> None:
    _, token = await issue(store)
    assert await reason_for(token, store, pepper=b"x" * 32) == "hash_mismatch"


async def test_forged_secret_with_a_real_key_id_is_hash_mismatch(store: SqliteStore) -> None:
    key_id, _ = await issue(store)
    body = f"sgk_{key_id}_{'A' * 43}_"  # well-formed, right id, wrong secret
    assert await reason_for(body + _checksum(body), store) == "hash_mismatch"


async def test_an_unknown_key_id_costs_the_same_work_as_a_wrong_secret(
        store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both failures read one chain row and compute one HMAC, so the answer time does not tell whether
    a key id exists (bench/auth_timing.py measures the medians)."""
    import proxy.steps.authn
    import proxy.store.sqlite
    hmacs: list[str] = []
    rows: list[str] = []
    real_verify, real_from_row = proxy.steps.authn.verify_secret, proxy.store.sqlite._from_row
    monkeypatch.setattr(proxy.steps.authn, "verify_secret", lambda *a: hmacs.append("h") or real_verify(*a))
    monkeypatch.setattr(proxy.store.sqlite, "_from_row", lambda r: rows.append(r[0]) or real_from_row(r))
    key_id, _ = await issue(store)
    body = f"sgk_{key_id}_{'A' * 43}_"
    unknown_id, unknown = generate_key()
    assert await reason_for(unknown, store) == "unknown_key"
    assert (len(hmacs), len(rows)) == (1, 1) and rows == [key_id]   # a real key's row read in its stead
    assert await reason_for(body + _checksum(body), store) == "hash_mismatch"
    assert (len(hmacs), len(rows)) == (2, 2) and rows[1] == key_id
    assert await store.get_chain(unknown_id) == []


async def test_hash_is_checked_before_state(store: SqliteStore) -> None:
    key_id, token = await issue(store, expires_at=NOW - 1, allowed_cidrs=("10.0.0.0/8",))
    await store.revoke_key(key_id, NOW)
    assert await reason_for(token, store, pepper=b"x" * 32) == "hash_mismatch"
    assert await reason_for(token, store) == "revoked"


async def test_expired(store: SqliteStore) -> None:
    _, token = await issue(store, expires_at=NOW)
    assert await reason_for(token, store, now=NOW) == "expired"
    assert (await authenticate(token, store, PEPPER, IP, NOW - 1)).tier == "app"


async def test_revocation_is_effective_on_the_next_request(store: SqliteStore) -> None:
    key_id, token = await issue(store)
    assert (await authenticate(token, store, PEPPER, IP, NOW)).key_id == key_id
    assert await store.revoke_key(key_id, NOW) == 1
    assert await reason_for(token, store) == "revoked"


async def test_revoked_ancestor_revokes_the_child(store: SqliteStore, tmp_path: Path) -> None:
    app_id, _ = await issue(store)
    _, token = await issue(store, tier="device", parent=app_id)
    # Revoke through a second connection, as another process (the CLI) would.
    async with await SqliteStore.open(tmp_path / "keys.db") as other:
        await other.revoke_key(app_id, NOW)
    assert await reason_for(token, store) == "revoked"


async def test_ancestor_revoked_or_expired_by_hand_is_revoked(store: SqliteStore) -> None:
    user_id, _ = await issue(store, tier="user", expires_at=NOW - 1)
    _, token = await issue(store, tier="session", parent=user_id)
    assert await reason_for(token, store) == "revoked"
    app_id, _ = await issue(store)
    _, dev_token = await issue(store, tier="device", parent=app_id)
    # Only the parent row revoked (no cascade), e.g. a replicated or hand-edited store.
    with sqlite3.connect(store.path) as raw:
        raw.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ?", (NOW, app_id))
    assert await reason_for(dev_token, store) == "revoked"


@pytest.mark.parametrize("ip,ok", [
    ("10.1.2.3", True), ("::ffff:10.1.2.3", True), ("2001:db8::5", True),
    ("11.0.0.1", False), ("2001:db9::1", False), ("not-an-ip", False), ("", False),
])
async def test_ip_binding(store: SqliteStore, ip: str, ok: bool) -> None:
    _, token = await issue(store, allowed_cidrs=("10.0.0.0/8", "2001:db8::/32", "bogus/99"))
    if ok:
        assert (await authenticate(token, store, PEPPER, ip, NOW)).tier == "app"
    else:
        assert await reason_for(token, store, ip=ip) == "ip_not_allowed"


async def test_ancestor_ip_binding_applies_to_the_child(store: SqliteStore) -> None:
    app_id, _ = await issue(store, allowed_cidrs=("10.0.0.0/8",))
    _, token = await issue(store, tier="device", parent=app_id, allowed_cidrs=("10.9.0.0/16",))
    assert (await authenticate(token, store, PEPPER, "10.9.1.1", NOW)).parents == (app_id,)
    assert await reason_for(token, store, ip="10.8.1.1") == "ip_not_allowed"
    assert await reason_for(token, store, ip="192.168.0.1") == "ip_not_allowed"


async def test_unbound_key_accepts_any_ip(store: SqliteStore) -> None:
    _, token = await issue(store)
    assert (await authenticate(token, store, PEPPER, "not-an-ip", NOW)).tier == "app"


async def test_store_failure_is_not_success(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "keys.db")
    _, token = await issue(s)
    await s.close()
    with pytest.raises(StoreUnavailable):
        await authenticate(token, s, PEPPER, IP, NOW)
