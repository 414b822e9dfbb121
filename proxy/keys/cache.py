"""A bounded LRU of verified credentials (API keys and session JWTs), invalidated exactly by the store's revision.

What is cached is the *chain* (the key's and its ancestors' records) and the Principal built
from it, never a decision: the client IP and the expiry of every record are still checked per
request by `authn.check_chain`, since they differ per request.

Invalidation, all exact:
- every create/revoke/expiry change bumps `store.revision()`, in this process or any other (the
  CLI, another worker); so does a session (jti) revocation. An entry is used only while the
  revision it was made at is still current. Reading the revision is a database query, so every
  request instead reads the store's change signal (store/change_signal.py, a shared-memory word
  every committed change rewrites): while it is unchanged the revision is too, and the query runs
  only when it moved or `revision_check_ms` passed (a backstop for a writer that died between its
  commit and the signal). A revocation reported done counts on the very next request, in every
  process. `revision_check_ms = 0` reads the revision on every request regardless. Otherwise
  requests that find it due while a read is under way, with the signal unchanged, share that read:
  a burst of 32 requests made 32 queries, one behind the other, the first time each second.
- an entry lives at most `ttl_s` after it was verified, and never past the expiry of the key,
  any ancestor, or the session token's `exp`.
- while the store is unreadable (locked, gone), an entry within its TTL keeps working; an
  uncached credential still fails with StoreUnavailable (503), as without the cache. Not once the
  change signal has moved since the last read while its channel is live: a change (a revocation,
  perhaps) was committed that cannot be read, so every entry goes and credentials fail closed
  until the store answers again.

A miss reads the credential's chain from the store (`chain`). Requests that miss on the same key
at once, under the same change signal, share that read as they share a revision read: a burst
arriving after its entry's TTL ran out made 32 chain queries, one behind the other through the
store's one connection, 5-16 ms before the first request was forwarded.

Entries are keyed by a BLAKE2b MAC of the presented token under a random per-process key, so
the plaintext token is never kept as a dict key and a memory dump yields nothing replayable.
Only successes are cached; unknown or wrong credentials always go to the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from proxy.context import Principal
from proxy.errors import StoreUnavailable
from proxy.settings import AuthSettings
from proxy.store import KeyRecord, KeyStore

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CachedAuth:
    """A verified credential: the chain to re-check per request and the Principal it yields."""

    chain: tuple[KeyRecord, ...]
    principal: Principal
    revision: int          # store revision read before the chain was
    valid_until: float     # min(verified + ttl, every record's expiry, the session's exp)


class KeyCache:
    """Verified credentials by keyed token digest; see the module docstring for the invalidation rules."""

    def __init__(self, *, size: int, ttl_s: float, revision_check_ms: float = 0.0) -> None:
        if size < 0 or ttl_s < 0 or revision_check_ms < 0:
            raise ValueError("key cache size, ttl and revision interval must be 0 or more")
        self.size, self.ttl_s = size, ttl_s
        self._check_s = revision_check_ms / 1000.0
        self._mac_key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, CachedAuth] = OrderedDict()
        self._revision: int | None = None   # the last revision read; None before the first read
        self._signal: int | None = None     # the change signal as it was just before that read
        self._checked_at = float("-inf")
        # Reads under way, shared while the change signal they began under holds: the revision read
        # (key None) and chain reads (key: the key id). Value: (signal, the read).
        self._under_way: dict[str | None, tuple[int, asyncio.Future[Any]]] = {}

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> KeyCache:
        return cls(size=auth.key_cache_size, ttl_s=auth.key_cache_ttl_s,
                   revision_check_ms=auth.key_cache_revision_check_ms)

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.ttl_s > 0

    def __len__(self) -> int:
        return len(self._entries)

    def digest(self, token: str) -> bytes:
        return hashlib.blake2b(token.encode(), key=self._mac_key, digest_size=32).digest()

    async def revision(self, store: KeyStore, now: float) -> int | None:
        """The store revision as of now (the last one read while the change signal is still); None if unreadable.

        A changed revision clears the cache. Called before any store read whose result is cached.
        """
        signal = store.change_signal()
        if (self._revision is not None and signal is not None and signal == self._signal
                and 0 <= now - self._checked_at < self._check_s):
            return self._revision
        if self._check_s <= 0 or signal is None:   # every request reads: nothing to share
            return await self._read(store, signal, now)
        return await self._shared(None, signal, lambda: self._read(store, signal, now))

    async def chain(self, store: KeyStore, key_id: str) -> list[KeyRecord]:
        """`store.get_chain(key_id)`, one read shared by the requests that ask for it while it runs.

        Only under an unchanged change signal, as for the revision read. A store with no signal
        (or PostgreSQL with its channel down) never shares. A store error reaches every request
        that shared the read: each fails closed. The chain returned is shared too: read it only.
        """
        signal = store.change_signal()
        if signal is None:
            return await store.get_chain(key_id)
        return await self._shared(key_id, signal, lambda: store.get_chain(key_id))

    async def _shared(self, key: str | None, signal: int, start: Callable[[], Awaitable[T]]) -> T:
        """`start()`'s result, or that of the same read begun under this same signal and still under way.

        Sharing such a read is as exact as using its result afterwards: a request that arrives after
        a commit (a revocation, say) moved the signal starts a read of its own.
        """
        under_way = self._under_way.get(key)
        if under_way is not None and under_way[0] == signal:
            return cast(T, await asyncio.shield(under_way[1]))
        read = asyncio.ensure_future(start())
        read.add_done_callback(_consume_error)
        self._under_way[key] = (signal, read)
        try:
            # Shielded: a request cancelled while it waits must not cancel the others' read.
            return await asyncio.shield(read)
        finally:
            if (entry := self._under_way.get(key)) is not None and entry[1] is read:
                del self._under_way[key]

    async def _read(self, store: KeyStore, signal: int | None, now: float) -> int | None:
        try:
            rev = await store.revision()
        except StoreUnavailable:
            if (signal is not None and self._signal is not None and signal != self._signal
                    and store.change_signal_live()):
                # A change was committed (the signal moved) that cannot be read now: it may be the
                # revocation of a cached key. Fail closed: no entry serves until a read succeeds. (A
                # signal whose channel is down moves on every read: the store is away, not changed.)
                self._entries.clear()
            return None
        if rev != self._revision:
            self._entries.clear()
            self._revision = rev
        # Read before the revision: a change committed in between moves the signal again.
        self._signal = signal
        self._checked_at = now
        return rev

    async def lookup(self, token: str, store: KeyStore, now: float) -> tuple[CachedAuth | None, int | None]:
        """(the usable entry or None, the revision a fresh verification should be stored under or None)."""
        if not self.enabled:
            return None, None
        rev = await self.revision(store, now)
        key = self.digest(token)
        entry = self._entries.get(key)
        if entry is None:
            return None, rev
        # rev None: the store is unreadable; the entry made at the last known revision serves out its TTL.
        if entry.revision != self._revision or now >= entry.valid_until:
            del self._entries[key]
            return None, rev
        self._entries.move_to_end(key)
        return entry, rev

    def put(self, token: str, revision: int | None, chain: list[KeyRecord], principal: Principal,
            now: float, expires_at: float | None = None) -> None:
        """Remember a credential verified from a chain read after `revision` was (None: don't)."""
        if not self.enabled or revision is None or revision != self._revision:
            return   # verified against a revision already superseded: not safe to keep
        until = now + self.ttl_s
        for when in (expires_at, *(r.expires_at for r in chain)):
            if when is not None:
                until = min(until, when)
        if now >= until:
            return
        key = self.digest(token)
        self._entries[key] = CachedAuth(tuple(chain), principal, revision, until)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def _consume_error(read: asyncio.Future[Any]) -> None:
    """Marks a shared read's error as seen: the request that began it may have been cancelled meanwhile."""
    if not read.cancelled():
        read.exception()
