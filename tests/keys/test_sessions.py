"""Session JWTs: minting, strict verification with an injected clock, and authn over the parent chain."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.context import Principal
from proxy.errors import Unauthenticated
from proxy.keys.envelope import Envelope
from proxy.keys.issue import issue_key
from proxy.keys.kek import FileKek
from proxy.keys.sessions import MAX_TTL_S, SessionAuthority, load_signing_keys
from proxy.settings import SettingsError, load_settings
from proxy.steps.authn import authenticate
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_secrets import SqliteSecretRows
from tests.sessiontokens import attack_tokens

PEPPER = b"p" * 32
KID = "00112233445566aa"
NOW = 1_800_000_000.0


class Env:
    def __init__(self, store: SqliteStore, rows: SqliteSecretRows, key: Ed25519PrivateKey) -> None:
        self.store, self.rows, self.key = store, rows, key
        self.auth = SessionAuthority({KID: key}, KID, issuer="seekgate", audience="seekgate",
                                     ttl_s=900, revocations=rows)

    async def user(self, **kw: Any) -> tuple[str, Principal]:
        rec, token = await issue_key(self.store, PEPPER, tier=kw.pop("tier", "user"), owner="alice",
                                     roles=kw.pop("roles", ("user", "ml")), now=NOW - 60, **kw)
        return token, await authenticate(token, self.store, PEPPER, "10.0.0.5", NOW)

    async def auth_session(self, token: str, now: float = NOW, ip: str = "10.0.0.5") -> Principal:
        return await authenticate(token, self.store, PEPPER, ip, now, self.auth)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = await SqliteStore.open(tmp_path / "keys.db")
    try:
        yield Env(store, await SqliteSecretRows.open(store), Ed25519PrivateKey.generate())
    finally:
        await store.close()


async def test_session_inherits_its_parent_and_names_it(env: Env) -> None:
    _, parent = await env.user(labels={"team": "nlp"}, models=("deepseek",))
    minted = env.auth.mint(parent, NOW)
    assert minted.expires_at == int(NOW) + 900
    header = jwt.get_unverified_header(minted.token)
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": KID}
    p = await env.auth_session(minted.token)
    assert (p.key_id, p.tier, p.owner) == (minted.jti, "session", "alice")
    assert p.roles == ("user", "ml") and p.models == ("deepseek",) and p.labels == {"team": "nlp"}
    assert p.parents == (parent.key_id,)
    assert [e[:2] for e in p.limits] == [(minted.jti, "session"), (parent.key_id, "user")]


async def test_expiry_follows_the_injected_clock(env: Env) -> None:
    _, parent = await env.user()
    minted = env.auth.mint(parent, NOW)
    await env.auth_session(minted.token, now=NOW + 899)
    for later in (NOW + 900, NOW + 10_000):
        with pytest.raises(Unauthenticated) as e:
            await env.auth_session(minted.token, now=later)
        assert e.value.reason == "session_expired"


async def test_every_forged_token_is_refused(env: Env) -> None:
    _, parent = await env.user()
    good = jwt.decode(env.auth.mint(parent, NOW).token, options={"verify_signature": False})
    tokens = attack_tokens(env.key, KID, good, int(NOW))
    reasons = {}
    for name, token in tokens.items():
        with pytest.raises(Unauthenticated) as e:
            await env.auth_session(token)
        reasons[name] = e.value.reason
    assert reasons["alg_none"] == reasons["alg_None"] == reasons["hs256_with_public_key"] == "session_bad_alg"
    assert reasons["expired"] == "session_expired"
    assert reasons["future_nbf"] == reasons["future_iat"] == "session_not_yet_valid"
    assert reasons["lifetime_over_max"] == "session_lifetime_too_long"
    assert reasons["missing_exp"] == reasons["missing_parent"] == "session_missing_claim"
    assert {reasons[k] for k in ("wrong_iss", "lookalike_iss", "cyrillic_iss", "wrong_aud", "lookalike_aud",
                                 "aud_list")} == {"session_wrong_audience_or_issuer"}
    assert {reasons[k] for k in ("unknown_kid", "path_kid", "no_kid")} == {"session_unknown_kid"}
    assert {reasons[k] for k in ("jku_header", "x5u_header", "jwk_header", "x5c_header")} \
        == {"session_header_refused"}
    assert reasons["oversized"] == "session_token_too_large"
    assert {reasons[k] for k in ("tampered_signature", "tampered_claims", "signed_by_another_key")} \
        == {"session_bad_signature"}


async def test_a_single_session_is_revoked_by_jti(env: Env) -> None:
    _, parent = await env.user()
    a, b = env.auth.mint(parent, NOW), env.auth.mint(parent, NOW)
    assert await env.rows.revoke_session(a.jti, NOW) is True
    assert await env.rows.revoke_session(a.jti, NOW) is False
    with pytest.raises(Unauthenticated) as e:
        await env.auth_session(a.token)
    assert e.value.reason == "session_revoked"
    await env.auth_session(b.token)


async def test_revoking_the_parent_ends_its_sessions_on_the_next_request(env: Env) -> None:
    _, parent = await env.user()
    minted = env.auth.mint(parent, NOW)
    await env.auth_session(minted.token)
    await env.store.revoke_key(parent.key_id, NOW)
    with pytest.raises(Unauthenticated) as e:
        await env.auth_session(minted.token)
    assert e.value.reason == "revoked"


async def test_app_key_sessions_keep_the_ip_binding(env: Env) -> None:
    _, app = await env.user(tier="app", roles=(), allowed_cidrs=("10.0.0.0/24",))
    minted = env.auth.mint(app, NOW)
    await env.auth_session(minted.token, ip="10.0.0.9")
    with pytest.raises(Unauthenticated) as e:
        await env.auth_session(minted.token, ip="192.0.2.1")
    assert e.value.reason == "ip_not_allowed"


async def test_scope_is_never_wider_than_the_parent(env: Env) -> None:
    _, parent = await env.user(roles=("user",))
    minted = env.auth.mint(parent, NOW)
    # A token claiming more roles than its parent holds (as if minted before a change) gets the overlap.
    claims = {**jwt.decode(minted.token, options={"verify_signature": False}), "roles": ["user", "admin"]}
    wider = jwt.encode(claims, env.key, algorithm="EdDSA", headers={"kid": KID})
    assert (await env.auth_session(wider)).roles == ("user",)


async def test_sessions_and_devices_cannot_mint(env: Env) -> None:
    _, parent = await env.user()
    session = await env.auth_session(env.auth.mint(parent, NOW).token)
    for p in (session, Principal(key_id="x", tier="device", owner="d")):
        with pytest.raises(Unauthenticated):
            env.auth.mint(p, NOW)


async def test_api_key_where_a_jwt_is_expected_and_the_reverse(env: Env) -> None:
    api_key, parent = await env.user()
    session = env.auth.mint(parent, NOW).token
    with pytest.raises(Unauthenticated):
        env.auth.verify(api_key, NOW)
    for token in ("sgk_" + session, session + api_key):
        with pytest.raises(Unauthenticated):
            await env.auth_session(token)
    # A gateway without sessions configured treats a JWT as malformed.
    with pytest.raises(Unauthenticated) as e:
        await authenticate(session, env.store, PEPPER, "10.0.0.5", NOW)
    assert e.value.reason == "malformed"


async def test_signing_keys_are_envelope_encrypted_and_reloaded(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "keys.db")
    try:
        envelope = Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(tmp_path))
        keys, active = await load_signing_keys(envelope)
        again, active2 = await load_signing_keys(envelope)
        assert list(keys) == list(again) == [active] and active2 == active
        raw = keys[active].private_bytes_raw()
    finally:
        await store.close()
    disk = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert raw not in disk and raw.hex().encode() not in disk


def test_ttl_setting_is_validated_and_capped() -> None:
    assert load_settings(None, env={}).auth.session_ttl_s == MAX_TTL_S
    assert load_settings(None, env={}, overrides={"auth.session_ttl_s": 60}).auth.session_ttl_s == 60
    for bad in (0, -1, 901, float("inf")):
        with pytest.raises(SettingsError, match="auth.session_ttl_s"):
            load_settings(None, env={}, overrides={"auth.session_ttl_s": bad})
    with pytest.raises(ValueError):
        SessionAuthority({KID: Ed25519PrivateKey.generate()}, KID, issuer="i", audience="a", ttl_s=901)


def test_short_ttl_tokens_expire_sooner() -> None:
    key = Ed25519PrivateKey.generate()
    auth = SessionAuthority({KID: key}, KID, issuer="i", audience="a", ttl_s=60)
    minted = auth.mint(Principal(key_id="abcdefghijkl", tier="user", owner="o"), time.time())
    assert minted.expires_at - int(time.time()) <= 60
    auth.verify(minted.token, minted.expires_at - 1)
    with pytest.raises(Unauthenticated):
        auth.verify(minted.token, minted.expires_at)
