"""Key storage: the KeyRecord row and the KeyStore interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

TIERS = ("app", "device", "user", "session")


class StoreConflict(ValueError):
    """A write the store refused: duplicate key id, or a parent that does not exist."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord:
    """One stored key. Never holds the secret, only its keyed hash."""

    key_id: str
    secret_hash: str
    tier: str                                   # app | device | user | session
    owner: str
    roles: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()                # () means any model
    allowed_cidrs: tuple[str, ...] = ()         # () means any client address
    limits: dict[str, int] = field(default_factory=dict)   # set limits only; the rest: tier defaults
    parent_id: str | None = None
    successor_id: str | None = None             # the key a rotation issued in its place (set once, never cleared)
    prefix: str = ""                            # "sgk_<key_id>", for listings
    last4: str = ""
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    pepper_version: int = 1                     # the pepper secret_hash was made with (keys/hashing.py)


@dataclass(frozen=True, slots=True)
class Rotated:
    """What KeyStore.rotate did: nothing, as `earlier` succeeds the key already; or all of the rotation."""

    earlier: str | None = None       # the successor recorded before this call: nothing was written
    moved: tuple[str, ...] = ()      # the children moved under the successor, oldest first


@runtime_checkable
class KeyStore(Protocol):
    """What authn, the admin API and the CLI need from a key store.

    Every read failure surfaces as `proxy.errors.StoreUnavailable` (fail closed).
    """

    async def close(self) -> None: ...

    async def create_key(self, rec: KeyRecord) -> None: ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def get_chain(self, key_id: str) -> list[KeyRecord]:
        """The key, then its ancestors nearest first; [] if the key is unknown."""
        ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def children(self, parent_ids: list[str]) -> list[KeyRecord]:
        """The keys whose parent is one of `parent_ids`, oldest first (created_at, then key id).

        One level of a subtree in one query (a few on SQLite, whose statements take a bounded number of
        values), by the parent index, never a whole listing.
        """
        ...

    async def page_keys(self, limit: int, after: str | None = None,
                        expiring: tuple[float, float] | None = None) -> list[KeyRecord]:
        """Up to `limit` keys in key id order, those after key id `after` (None: from the first).

        `expiring` (start, end): only unrevoked keys whose expiry is after start and at or before end.
        Paged in the query (the admin API's listing of a large fleet), never by slicing list_keys.
        """
        ...

    async def list_expiring(self, within_s: float, now: float) -> list[KeyRecord]:
        """Unrevoked keys that expire after `now` and within `within_s` of it, soonest first.

        For the periodic expiry events: they must not load every key of a large fleet.
        """
        ...

    async def count_expiring(self, within_s: float, now: float) -> dict[str, int]:
        """How many keys of each tier `list_expiring` would return (tiers with none left out); for the gauge."""
        ...

    async def revoke_key(self, key_id: str, now: float) -> int:
        """Revoke the key and every descendant; returns how many were newly revoked."""
        ...

    async def shorten_expiry(self, key_id: str, expires_at: float) -> bool:
        """Bring the key's expiry forward to `expires_at`, never later; True if it changed."""
        ...

    async def rotate(self, key_id: str, successor: KeyRecord, expires_at: float, *,
                     move_children: bool) -> Rotated:
        """Rotate `successor` in for `key_id`: all of it in one transaction, or nothing.

        Unless `key_id` records a successor already (then nothing is written: `Rotated(earlier=...)`):
        store `successor`, record it as `key_id`'s successor_id, move `key_id`'s unrevoked children under
        it if `move_children`, and bring `key_id`'s expiry forward to `expires_at` (never later). Of two
        rotations of one key at once exactly one succeeds; any failure part-way (StoreUnavailable) leaves
        the store as it was, so no key names a successor whose secret nobody was shown.
        """
        ...

    async def claim_expiry_notice(self, key_id: str, expires_at: float, now: float) -> bool:
        """Record that the expiry `expires_at` of `key_id` is announced; False if it already was.

        Atomic, so of several processes sharing the store exactly one announces each expiry.
        """
        ...

    async def has_any_admin(self) -> bool: ...

    async def revision(self) -> int:
        """A counter bumped by every change, so caches elsewhere can notice."""
        ...

    def change_signal(self) -> int | None:
        """Changes whenever any process commits a change; a memory read, for the key cache's hot path."""
        ...

    def change_signal_live(self) -> bool:
        """Whether change_signal moves only for committed changes now (False: its channel is down, and it
        moves on every read to make readers re-read)."""
        ...


__all__ = ["TIERS", "KeyRecord", "KeyStore", "Rotated", "StoreConflict"]
