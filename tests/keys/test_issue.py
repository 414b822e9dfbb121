"""Key issuance: tiers, defaults, parent bounds, CIDRs, durations and the public view."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from proxy.keys.hashing import verify_secret
from proxy.keys.issue import DAY, TIER_DEFAULT, issue_key, parse_duration, public_view
from proxy.steps.authn import authenticate
from proxy.store import KeyRecord
from proxy.store.sqlite import SqliteStore

PEPPER = b"p" * 32
NOW = 1_700_000_000.0


@pytest_asyncio.fixture(loop_scope="function")
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "keys.db")
    yield s
    await s.close()


async def app_key(store: SqliteStore, **kw: object) -> str:
    args: dict[str, object] = {"tier": "app", "owner": "billing", "now": NOW,
                               "expires_in_s": TIER_DEFAULT, **kw}
    rec, _ = await issue_key(store, PEPPER, **args)  # type: ignore[arg-type]
    return rec.key_id


@pytest.mark.parametrize("text, seconds", [
    ("90d", 90 * DAY), ("12h", 12 * 3600.0), ("30m", 1800.0), ("3600s", 3600.0),
    (" 7D ", 7 * DAY), ("never", None), ("NEVER", None),
])
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "0d", "-1d", "1.5h", "10", "d", "1y", "1h30m", "forever", "9" * 400 + "d"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(bad)


async def test_user_key_is_stored_as_hash_and_authenticates(store: SqliteStore) -> None:
    rec, token = await issue_key(store, PEPPER, tier="user", owner="alice", roles=("user",),
                                 labels={"team": "nlp"}, models=("deepseek",),
                                 expires_in_s=TIER_DEFAULT, now=NOW)
    stored = await store.get_key(rec.key_id)
    assert stored == rec
    assert token not in repr(stored) and stored.secret_hash != token
    assert verify_secret(PEPPER, token, stored.secret_hash)
    assert rec.prefix == "sgk_" + rec.key_id and token.endswith(rec.last4)
    assert rec.expires_at == NOW + 90 * DAY
    principal = await authenticate(token, store, PEPPER, "10.0.0.1", NOW + 1)
    assert (principal.owner, principal.roles, principal.models) == ("alice", ("user",), ("deepseek",))


async def test_tier_default_expiry_and_explicit_choices(store: SqliteStore) -> None:
    app, _ = await issue_key(store, PEPPER, tier="app", owner="a", expires_in_s=TIER_DEFAULT, now=NOW)
    assert app.expires_at == NOW + 365 * DAY
    never, _ = await issue_key(store, PEPPER, tier="user", owner="b", expires_in_s=None, now=NOW)
    assert never.expires_at is None
    short, _ = await issue_key(store, PEPPER, tier="user", owner="c", expires_in_s=60, now=NOW)
    assert short.expires_at == NOW + 60


@pytest.mark.parametrize("kw, message", [
    ({"tier": "session"}, "session tokens"),
    ({"tier": "root"}, "tier must be one of"),
    ({"tier": "user", "owner": ""}, "owner"),
    ({"tier": "user", "owner": "   "}, "owner"),
    ({"tier": "user", "roles": ("bad role",)}, "bad role"),
    ({"tier": "user", "models": ("",)}, "bad model"),
    ({"tier": "user", "labels": {"team": ""}}, "label 'team'"),
    ({"tier": "user", "labels": {"bad key": "x"}}, "bad label name"),
    ({"tier": "user", "allowed_cidrs": ("10.0.0.0/33",)}, "bad CIDR"),
    ({"tier": "user", "allowed_cidrs": ("10.1.2.3/8",)}, "host bits"),
    ({"tier": "user", "allowed_cidrs": ("not-an-ip",)}, "bad CIDR"),
    ({"tier": "user", "expires_in_s": 0}, "positive"),
    ({"tier": "user", "expires_in_s": float("inf")}, "positive"),
    ({"tier": "user", "parent_id": "aaaaaaaaaaaa"}, "have no parent"),
    ({"tier": "device"}, "needs a parent"),
    ({"tier": "device", "parent_id": "aaaaaaaaaaaa"}, "not found"),
    ({"tier": "device", "parent_id": "../../etc"}, "not found"),
])
async def test_bad_input_raises_value_error(store: SqliteStore, kw: dict[str, object],
                                            message: str) -> None:
    args: dict[str, object] = {"owner": "alice", "expires_in_s": TIER_DEFAULT, "now": NOW, **kw}
    with pytest.raises(ValueError, match=message):
        await issue_key(store, PEPPER, **args)  # type: ignore[arg-type]
    assert await store.list_keys() == []


async def test_cidrs_are_normalised(store: SqliteStore) -> None:
    rec, _ = await issue_key(store, PEPPER, tier="app", owner="a", now=NOW,
                             allowed_cidrs=("10.0.0.0/8", "192.168.1.7", "10.0.0.0/8", "2001:db8::/32"))
    assert rec.allowed_cidrs == ("10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32")


async def test_device_inherits_parent_bounds(store: SqliteStore) -> None:
    parent = await app_key(store, roles=("svc",), models=("deepseek",), labels={"team": "nlp"},
                           allowed_cidrs=("10.0.0.0/8",), expires_in_s=30 * DAY)
    dev, token = await issue_key(store, PEPPER, tier="device", owner="sensor-1", parent_id=parent,
                                 labels={"site": "plant-3"}, expires_in_s=TIER_DEFAULT, now=NOW)
    assert dev.parent_id == parent
    assert (dev.roles, dev.models, dev.allowed_cidrs) == (("svc",), ("deepseek",), ("10.0.0.0/8",))
    assert dev.labels == {"team": "nlp", "site": "plant-3"}
    assert dev.expires_at == NOW + 30 * DAY
    principal = await authenticate(token, store, PEPPER, "10.1.2.3", NOW + 1)
    assert principal.parents == (parent,)


async def test_device_may_narrow_within_parent(store: SqliteStore) -> None:
    parent = await app_key(store, roles=("svc", "ml"), models=("deepseek", "other"),
                           allowed_cidrs=("10.0.0.0/8",))
    dev, _ = await issue_key(store, PEPPER, tier="device", owner="d", parent_id=parent, roles=("ml",),
                             models=("deepseek",), allowed_cidrs=("10.9.0.0/16",),
                             expires_in_s=3600, now=NOW)
    assert (dev.roles, dev.models, dev.allowed_cidrs) == (("ml",), ("deepseek",), ("10.9.0.0/16",))
    assert dev.expires_at == NOW + 3600


@pytest.mark.parametrize("kw, message", [
    ({"roles": ("admin",)}, "not held by parent"),
    ({"models": ("other",)}, "outside parent"),
    ({"allowed_cidrs": ("11.0.0.0/8",)}, "outside parent"),
    ({"allowed_cidrs": ("0.0.0.0/0",)}, "outside parent"),
    ({"allowed_cidrs": ("::/0",)}, "outside parent"),
    ({"labels": {"team": "other"}}, "conflict"),
])
async def test_device_cannot_widen_parent(store: SqliteStore, kw: dict[str, object], message: str) -> None:
    parent = await app_key(store, roles=("svc",), models=("deepseek",), labels={"team": "nlp"},
                           allowed_cidrs=("10.0.0.0/8",))
    with pytest.raises(ValueError, match=message):
        await issue_key(store, PEPPER, tier="device", owner="d", parent_id=parent,
                        expires_in_s=TIER_DEFAULT, now=NOW, **kw)  # type: ignore[arg-type]


async def test_device_expiry_never_beyond_parent(store: SqliteStore) -> None:
    parent = await app_key(store, expires_in_s=10 * DAY)
    for asked in (365 * DAY, None):
        dev, _ = await issue_key(store, PEPPER, tier="device", owner="d", parent_id=parent,
                                 expires_in_s=asked, now=NOW)
        assert dev.expires_at == NOW + 10 * DAY
    forever = await app_key(store, expires_in_s=None)
    dev, _ = await issue_key(store, PEPPER, tier="device", owner="d", parent_id=forever,
                             expires_in_s=TIER_DEFAULT, now=NOW)
    assert dev.expires_at == NOW + 365 * DAY


async def test_device_needs_live_app_parent(store: SqliteStore) -> None:
    user, _ = await issue_key(store, PEPPER, tier="user", owner="u", expires_in_s=TIER_DEFAULT, now=NOW)
    with pytest.raises(ValueError, match="must be an app key"):
        await issue_key(store, PEPPER, tier="device", owner="d", parent_id=user.key_id,
                        expires_in_s=TIER_DEFAULT, now=NOW)
    revoked = await app_key(store)
    await store.revoke_key(revoked, NOW)
    with pytest.raises(ValueError, match="is revoked"):
        await issue_key(store, PEPPER, tier="device", owner="d", parent_id=revoked,
                        expires_in_s=TIER_DEFAULT, now=NOW)
    expired = await app_key(store, expires_in_s=60)
    with pytest.raises(ValueError, match="is expired"):
        await issue_key(store, PEPPER, tier="device", owner="d", parent_id=expired,
                        expires_in_s=TIER_DEFAULT, now=NOW + 61)


async def test_public_view_never_holds_the_secret(store: SqliteStore) -> None:
    rec, token = await issue_key(store, PEPPER, tier="user", owner="alice", roles=("user",),
                                 expires_in_s=3600, now=NOW)
    view = public_view(rec, now=NOW)
    assert set(view) == {"id", "prefix", "last4", "tier", "owner", "roles", "labels", "models",
                         "allowed_cidrs", "parent_id", "successor_id", "limits", "created_at", "expires_at", "revoked_at",
                         "status"}
    text = repr(view)
    assert token not in text and rec.secret_hash not in text
    assert view["created_at"] == "2023-11-14T22:13:20Z"
    assert view["expires_at"] == "2023-11-14T23:13:20Z"
    assert (view["revoked_at"], view["status"]) == (None, "active")
    assert public_view(rec, now=NOW + 3600)["status"] == "expired"
    await store.revoke_key(rec.key_id, NOW + 5)
    revoked = public_view(await store.get_key(rec.key_id), now=NOW + 10)  # type: ignore[arg-type]
    assert (revoked["status"], revoked["revoked_at"]) == ("revoked", "2023-11-14T22:13:25Z")


def test_an_expiry_past_the_calendar_is_shown_as_its_end_not_a_failed_listing() -> None:
    """Stored before durations were capped (or by hand): every listing that held it failed with a 500."""
    from dataclasses import replace

    rec = KeyRecord(key_id="abcdefghijkl", secret_hash="h", pepper_version=1, tier="user", owner="o",
                    roles=(), prefix="p", last4="l", created_at=NOW)
    assert public_view(replace(rec, expires_at=NOW + 99999999 * DAY), now=NOW)["expires_at"] == "9999-12-31T23:59:59Z"
    assert public_view(replace(rec, expires_at=1e300), now=NOW)["status"] == "active"
