"""The authenticate step: a bearer credential becomes a Principal, or Unauthenticated."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from proxy.context import IPAddress, Principal, client_address
from proxy.errors import StoreUnavailable, Unauthenticated
from proxy.keys.cache import KeyCache
from proxy.keys.format import PREFIX, KeyFormatError, parse_key
from proxy.keys.hashing import hash_secret, pepper_for, pepper_version, verify_secret
from proxy.keys.sessions import MINTING_TIERS, SessionAuthority
from proxy.state.sign_in_guard import SignInGuard
from proxy.store import KeyRecord, KeyStore

# RFC 6750 b64token: covers API keys and JWTs. Anything longer is not ours.
_BEARER_RE = re.compile(r"bearer ([A-Za-z0-9\-._~+/]+=*)", re.ASCII | re.IGNORECASE)
_MAX_HEADER = 4096

log = logging.getLogger("seekgate.authn")
# Stands in for the row of an unknown key id: its hash (64 hex digits, like every stored one) matches nothing.
_DECOY = KeyRecord(key_id="", secret_hash="0" * 64, tier="", owner="", created_at=0.0)


@runtime_checkable
class _Rehashes(Protocol):
    async def rehash_secret(self, key_id: str, old_hash: str, new_hash: str, pepper_version: int) -> bool: ...


def parse_bearer(header: str | None) -> str:
    """The token from `Authorization: Bearer <token>` (HTTP) or gRPC `authorization` metadata.

    Strict on purpose: one space, one token, nothing around it. Raises
    Unauthenticated("missing_credentials") when absent, ("malformed") otherwise.
    """
    if header is None or header == "":
        raise Unauthenticated("missing_credentials")
    if len(header) > _MAX_HEADER:
        raise Unauthenticated("malformed")
    m = _BEARER_RE.fullmatch(header)
    if m is None:
        raise Unauthenticated("malformed")
    return m.group(1)


async def authenticate(token: str, store: KeyStore, pepper: bytes, client_ip: str,
                       now: float, sessions: SessionAuthority | None = None,
                       cache: KeyCache | None = None, guard: SignInGuard | None = None) -> Principal:
    """Verify a bearer token against the store, or take it from `cache`; a revocation counts at once.

    The cache holds verified chains, not decisions: expiry and the IP binding are checked
    on every request, cached or not (see keys/cache.py for how entries are invalidated).

    Reasons (audit only; the client sees one body): malformed, bad_checksum,
    unknown_key, hash_mismatch, revoked, expired, ip_not_allowed, models_outside_parent, and
    for session JWTs (tokens without the key prefix) the session_* reasons of keys/sessions.py.
    A store failure propagates as StoreUnavailable (503), never as success.

    With a `guard`, a credential not in the cache and not seen to succeed before is refused
    (RateLimited, 429) while its client address has spent its failed sign-ins (state/sign_in_guard.py);
    every failure of one is counted against the address.
    """
    revision: int | None = None
    if cache is not None:
        hit, revision = await cache.lookup(token, store, now)
        if hit is not None:
            # No guard.succeeded() here: the store read that put it in the cache did, and the cache's
            # short TTL brings it back to the store (and the guard) long before 100,000 others could
            # push it out; a second keyed hash on every cached request is not worth that.
            check_chain(hit.chain, client_ip, now)
            return hit.principal
    exp: float | None = None
    if guard is not None:
        guard.check(client_ip, token)
    try:
        if not token.startswith(PREFIX):
            if sessions is None:
                raise Unauthenticated("malformed")
            principal, chain, exp = await _authenticate_session(token, store, sessions, client_ip, now, cache)
        else:
            principal, chain = await _authenticate_api_key(token, store, pepper, client_ip, now, cache)
    except Unauthenticated:
        if guard is not None:
            guard.failed(client_ip, token)
        raise
    if guard is not None:
        guard.succeeded(token)
    if cache is not None:
        cache.put(token, revision, chain, principal, now, exp)
    return principal


async def _read_chain(store: KeyStore, key_id: str, cache: KeyCache | None) -> list[KeyRecord]:
    """The chain from the store; through the cache, one read for every request that needs it at once."""
    return await (cache.chain(store, key_id) if cache is not None else store.get_chain(key_id))


async def _authenticate_session(token: str, store: KeyStore, sessions: SessionAuthority, client_ip: str,
                                now: float, cache: KeyCache | None) -> tuple[Principal, list[KeyRecord], float]:
    """A session JWT: signature and claims, then its own revocation, then its parent's whole chain.

    The chain is read on every request, so revoking the parent key (or any ancestor) ends
    its sessions at once. The session's scope is recomputed from the parent as it is now,
    never wider than the roles the token was minted with.
    """
    try:
        claims = sessions.verify(token, now)
    except Unauthenticated as exc:
        # A kid another process made a moment ago: reload the key set once, then decide.
        if exc.reason != "session_unknown_kid" or sessions.reload is None or not await sessions.reload():
            raise
        claims = sessions.verify(token, now)
    if await sessions.revoked(claims.jti):
        raise Unauthenticated("session_revoked")
    chain = await _read_chain(store, claims.parent, cache)
    if not chain or chain[0].key_id != claims.parent:
        raise Unauthenticated("unknown_key")
    parent = chain[0]
    if parent.tier not in MINTING_TIERS:
        raise Unauthenticated("session_from_wrong_tier")
    check_chain(chain, client_ip, now)
    return Principal(
        key_id=claims.jti, tier="session", owner=parent.owner,
        roles=tuple(r for r in claims.roles if r in parent.roles), labels=dict(parent.labels),
        models=effective_models(chain), parents=tuple(r.key_id for r in chain),
        # A session sets no limits of its own; its parent's (and their ancestors') bind it.
        limits=((claims.jti, "session", {}), *((r.key_id, r.tier, dict(r.limits)) for r in chain)),
    ), chain, float(claims.exp)


async def _authenticate_api_key(token: str, store: KeyStore, pepper: bytes, client_ip: str,
                                now: float, cache: KeyCache | None) -> tuple[Principal, list[KeyRecord]]:
    try:
        parsed = parse_key(token)
    except KeyFormatError as exc:
        # A typo or a random probe is turned away before any store lookup.
        raise Unauthenticated(exc.reason) from None
    chain = await _read_chain(store, parsed.key_id, cache)
    known = bool(chain) and chain[0].key_id == parsed.key_id
    # The secret is checked before any state, so someone holding only a key id learns nothing
    # about whether it is revoked, expired or IP-bound. An unknown id costs the same HMAC and
    # compare against a decoy, so the answer time does not tell whether the id exists either.
    key = chain[0] if known else _DECOY
    row_pepper = pepper_for(pepper, key.pepper_version if known else pepper_version(pepper))
    matches = row_pepper is not None and verify_secret(row_pepper, token, key.secret_hash)
    if not known:
        raise Unauthenticated("unknown_key")
    if not matches:
        raise Unauthenticated("hash_mismatch")
    check_chain(chain, client_ip, now)
    if key.pepper_version < pepper_version(pepper):
        _start_rehash(store, key, token, pepper)   # not awaited: the request never waits for a store write
    return Principal(
        key_id=key.key_id, tier=key.tier, owner=key.owner, roles=key.roles,
        labels=dict(key.labels), models=effective_models(chain),
        parents=tuple(r.key_id for r in chain[1:]),
        limits=tuple((r.key_id, r.tier, dict(r.limits)) for r in chain),
    ), chain


# Re-hashes under way, by key id: one at a time per key however many of its requests arrive at once, and a
# reference to each task so it is not collected half-way.
_rehashing: dict[str, asyncio.Task[None]] = {}


def _start_rehash(store: KeyStore, key: KeyRecord, token: str, pepper: bytes) -> None:
    """Pepper rotation: re-hash a row made under an older pepper, now that its key was used, in the background.

    Best effort: the request has succeeded already. Awaited here, a store whose write lock another process
    held (a CLI command, a migration, another worker's transaction) stalled this request for the whole busy
    timeout. A failed or refused write is retried on the key's next use that reads the store.
    """
    if not isinstance(store, _Rehashes):
        return
    running = _rehashing.get(key.key_id)
    if running is not None and not running.done() and running.get_loop() is asyncio.get_running_loop():
        return
    version = pepper_version(pepper)
    new_hash = hash_secret(pepper, token)   # now: the task holds the hash, never the plaintext token
    task = asyncio.get_running_loop().create_task(_rehash(store, key, new_hash, version),
                                                  name=f"rehash-{key.key_id}")
    _rehashing[key.key_id] = task
    task.add_done_callback(lambda t: _rehashing.pop(key.key_id, None) if _rehashing.get(key.key_id) is t else None)


async def _rehash(store: _Rehashes, key: KeyRecord, new_hash: str, version: int) -> None:
    try:
        await store.rehash_secret(key.key_id, key.secret_hash, new_hash, version)
    except StoreUnavailable as exc:
        log.warning("re-hashing key %s under pepper %d failed (retried on its next use): %s",
                    key.key_id, version, exc)
    except Exception:   # nobody awaits this task: say what went wrong here rather than at its collection
        log.exception("re-hashing key %s under pepper %d failed (retried on its next use)", key.key_id, version)


async def rehashes_settled() -> None:
    """Wait for the re-hashes under way on this loop (a shutdown that wants them written; tests)."""
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(t for t in list(_rehashing.values()) if t.get_loop() is loop), return_exceptions=True)


def check_chain(chain: Sequence[KeyRecord], client_ip: str, now: float) -> None:
    """Refuse if the key or any ancestor is revoked/expired, or the client IP is not bound.

    `chain` is the key then its ancestors, nearest first. The key's own expiry reads
    "expired"; a dead ancestor reads "revoked", since revoking covers descendants.
    """
    key, ancestors = chain[0], chain[1:]
    if key.revoked_at is not None:
        raise Unauthenticated("revoked")
    if _expired(key, now):
        raise Unauthenticated("expired")
    for rec in ancestors:
        if rec.revoked_at is not None or _expired(rec, now):
            raise Unauthenticated("revoked")
    addr: IPAddress | None = None
    for rec in chain:
        if not rec.allowed_cidrs:
            continue
        if addr is None:
            addr = client_address(client_ip)
        if addr is None or not _ip_in_any(addr, rec.allowed_cidrs):
            raise Unauthenticated("ip_not_allowed")


def effective_models(chain: list[KeyRecord]) -> tuple[str, ...]:
    """The models a key may use: its own list narrowed by every ancestor's; () means any.

    A child may not reach past its parent. If the narrowing leaves nothing the key
    is refused, because () would read as "any model".
    """
    allowed: tuple[str, ...] = ()
    for rec in chain:
        if not rec.models:
            continue
        allowed = rec.models if not allowed else tuple(m for m in allowed if m in rec.models)
        if not allowed:
            raise Unauthenticated("models_outside_parent")
    return allowed


def _expired(rec: KeyRecord, now: float) -> bool:
    return rec.expires_at is not None and now >= rec.expires_at


def _ip_in_any(addr: IPAddress, cidrs: tuple[str, ...]) -> bool:
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue  # a bad stored entry matches nothing: fail closed
        if addr.version == net.version and addr in net:
            return True
    return False
