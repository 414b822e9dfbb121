"""This process's recoverable secrets kept current: rotation of data keys, root, signing keys and pepper.

Every rotation is safe to run while requests flow, from this process or any other:
- DEK: a new data key serves new writes at once; rows under older ones stay readable
  and are re-encrypted in the background (at start, then every refresh interval).
- root: the provider makes a new root generation; DEKs are re-wrapped, data untouched;
  the old root is retired once no DEK names it.
- JWT: a new signing key signs at once; the old kid verifies for session TTL + leeway.
- pepper: a new version starts hashing once every process has loaded it; rows are
  re-hashed on their key's next successful use, and a version no live row uses is dropped.
A process learns of another's rotation within `crypto.refresh_interval_s`, at once for
an unknown session kid (authn asks `SessionAuthority.reload`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.audit.writer import admin_record
from proxy.keys.envelope import Envelope
from proxy.keys.hashing import PEPPER_PREFIX, Pepper, add_pepper_version, load_pepper
from proxy.keys.sessions import (
    SIGNING_KEY_PREFIX,
    SessionAuthority,
    load_signing_keys,
    retire_signing_keys,
    rotate_signing_key,
)
from proxy.settings import CryptoSettings, Settings
from proxy.store.backend import SecretRows, Store

log = logging.getLogger("seekgate.crypto")
DAY_S = 86400.0
_RELOAD_MIN_GAP_S = 1.0   # unknown-kid reloads at most this often: junk kids must not hammer the store


class Keyring:
    """The envelope plus what this process holds from it: session signing keys and the pepper."""

    def __init__(self, envelope: Envelope, rows: SecretRows, store: Store, settings: Settings,
                 data_dir: Path, sessions: SessionAuthority, pepper: Pepper,
                 clock: Callable[[], float] = time.time) -> None:
        self.envelope, self.rows, self.store = envelope, rows, store
        self.settings, self.data_dir, self._clock = settings, Path(data_dir), clock
        self.sessions, self.pepper = sessions, pepper
        self.on_pepper: Callable[[Pepper], None] | None = None   # e.g. swap AppState.pepper
        # A scheduled rotation done by maintain(): its audit record (the server sets AuditWriter.submit).
        self.on_scheduled: Callable[[dict[str, Any]], None] | None = None
        self._reloaded_at = float("-inf")
        sessions.reload = self.reload_sessions

    @classmethod
    async def open(cls, envelope: Envelope, rows: SecretRows, store: Store, settings: Settings,
                   data_dir: Path, clock: Callable[[], float] = time.time) -> Keyring:
        """Load (creating on first start) the signing keys and the pepper; any failure stops the start."""
        keys, active = await load_signing_keys(envelope)
        auth = settings.auth
        sessions = SessionAuthority(keys, active, issuer=auth.session_issuer, audience=auth.session_audience,
                                    ttl_s=auth.session_ttl_s, revocations=rows)
        pepper = await load_pepper(envelope, data_dir, clock(), publish_s(settings))
        return cls(envelope, rows, store, settings, data_dir, sessions, pepper, clock)

    # ------------------------------------------------------------ keeping current

    async def refresh(self) -> None:
        """Reload signing keys and pepper versions from the store (another process may have rotated)."""
        await self._reload_signing_keys()
        pepper = await load_pepper(self.envelope, self.data_dir, self._clock(), publish_s(self.settings))
        if pepper.version != self.pepper.version or pepper.versions != self.pepper.versions:
            log.info("pepper now version %d (held: %s)", pepper.version, pepper.versions)
        self.pepper = pepper
        if self.on_pepper is not None:
            self.on_pepper(pepper)

    async def _reload_signing_keys(self) -> bool:
        keys, active = await load_signing_keys(self.envelope)
        changed = set(keys) != set(self.sessions.kids) or active != self.sessions.active_kid
        if changed:
            self.sessions.replace_keys(keys, active)
            log.info("session signing keys reloaded: %s signs, %d verify", active, len(keys))
        return changed

    async def reload_sessions(self) -> bool:
        """For authn meeting an unknown kid: reload the signing keys (rate-limited); True if they changed."""
        now = time.monotonic()
        if now - self._reloaded_at < _RELOAD_MIN_GAP_S:
            return False
        self._reloaded_at = now
        return await self._reload_signing_keys()

    async def maintain(self) -> dict[str, Any]:
        """Run the rotations that are due and finish any left half-done (by a crash or another process)."""
        done: dict[str, Any] = {}
        now, c = self._clock(), self.settings.crypto
        if _due(await self.rows.event_time("root"), c.root_rotation_days, now):
            old_root = self.envelope.kek.key_id
            done["root"] = await self.envelope.rotate_root()
            self._scheduled("root", old_root, done["root"])
        if _due(await self.rows.event_time("dek"), c.dek_rotation_days, now):
            old_dek = await self.envelope.current_dek_id()
            done["dek"] = await self.envelope.rotate_dek()
            self._scheduled("dek", old_dek, done["dek"])
        moved = await self.envelope.reencrypt()
        rewrapped = await self.envelope.rewrap()
        if moved or rewrapped:
            done.update(reencrypted=moved, rewrapped=rewrapped)
        retired = await retire_signing_keys(self.envelope, now, self._jwt_keep_s())
        if retired:
            done["jwt_retired"] = retired
        dropped = await self._drop_unused_peppers(now)
        if dropped:
            done["pepper_retired"] = dropped
        if done:
            log.info("crypto maintenance: %s", done)
        return done

    async def run(self) -> None:
        """Until cancelled: maintain, then refresh, every crypto.refresh_interval_s; errors are logged, not fatal."""
        while True:
            try:
                await self.maintain()
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:   # a locked store or an unreachable KMS: keep serving with what is loaded
                log.exception("crypto maintenance failed; retrying in %ss", self.settings.crypto.refresh_interval_s)
            await asyncio.sleep(self.settings.crypto.refresh_interval_s)

    # ------------------------------------------------------------ on demand (CLI, admin)

    async def rotate_dek(self) -> dict[str, Any]:
        dek_id = await self.envelope.rotate_dek()
        return {"dek_id": dek_id, "reencrypted": await self.envelope.reencrypt()}

    async def rotate_root(self) -> dict[str, Any]:
        root = await self.envelope.rotate_root()
        return {"root": root, "pending_rewrap": await self._pending_rewrap()}

    async def rotate_jwt(self) -> dict[str, Any]:
        kid = await rotate_signing_key(self.envelope)
        await self._reload_signing_keys()
        retired = await retire_signing_keys(self.envelope, self._clock(), self._jwt_keep_s())
        await self.rows.record_event("jwt", self._clock())
        return {"kid": kid, "verifying": self.sessions.kids, "retired": retired}

    async def rotate_pepper(self) -> dict[str, Any]:
        version = await add_pepper_version(self.envelope)
        await self.rows.record_event("pepper", self._clock())
        return {"pepper_version": version, "hashing_from": self._clock() + publish_s(self.settings)}

    async def status(self) -> dict[str, Any]:
        now, c = self._clock(), self.settings.crypto
        root_at, dek_at = await self.rows.event_time("root"), await self.rows.event_time("dek")
        deks = await self.envelope.status()
        signing = await self.envelope.listing(SIGNING_KEY_PREFIX)
        peppers = [int(n[len(PEPPER_PREFIX):]) for n in await self.envelope.names(PEPPER_PREFIX)]
        return {
            "provider": c.provider,
            "root": {"key_id": self.envelope.kek.key_id, "rotated_at": root_at,
                     "due_at": _due_at(root_at, c.root_rotation_days),
                     "deks_not_rewrapped": await self._pending_rewrap()},
            "dek": {"current": next((d["dek_id"] for d in deks if d["current"]), None), "rotated_at": dek_at,
                    "due_at": _due_at(dek_at, c.dek_rotation_days),
                    "rows_not_reencrypted": sum(int(str(d["secrets"])) for d in deks if not d["current"]),
                    "keys": deks},
            "jwt": {"active_kid": signing[-1][0][len(SIGNING_KEY_PREFIX):] if signing else None,
                    "kids": [n[len(SIGNING_KEY_PREFIX):] for n, _ in signing],
                    "rotated_at": await self.rows.event_time("jwt")},
            "pepper": {"current_version": self.pepper.version, "versions": sorted(peppers),
                       "rows_by_version": await self.store.pepper_versions(now),
                       "rotated_at": await self.rows.event_time("pepper")},
            "checked_at": now,
        }

    # ------------------------------------------------------------ helpers

    def _scheduled(self, what: str, before: str | None, after: str) -> None:
        if self.on_scheduled is not None:
            self.on_scheduled(scheduled_rotation_record(what, before, after, self.settings.crypto))

    def _jwt_keep_s(self) -> float:
        return self.settings.auth.session_ttl_s + self.settings.crypto.jwt_retire_leeway_s

    async def _pending_rewrap(self) -> int:
        return sum(1 for _, kek_id, _, _ in await self.rows.list_deks() if kek_id != self.envelope.kek.key_id)

    async def _drop_unused_peppers(self, now: float) -> list[int]:
        """Delete pepper versions older than the current one that no live key row is hashed with."""
        live = await self.store.pepper_versions(now)
        dropped = []
        for name in await self.envelope.names(PEPPER_PREFIX):
            version = int(name[len(PEPPER_PREFIX):])
            if version < self.pepper.version and live.get(version, 0) == 0 and await self.envelope.delete(name):
                dropped.append(version)
        return dropped

    def close(self) -> None:
        self.envelope.kek.close()


def scheduled_rotation_record(what: str, before: str | None, after: str, crypto: CryptoSettings) -> dict[str, Any]:
    """The audit record of a scheduled `what` ("dek" or "root") rotation: ids only, never key material.

    Shaped like an admin call's record (the CLI's and the API's `crypto.rotate-*`), with the server
    itself as the actor; the writer adds the time and event id.
    """
    days = crypto.dek_rotation_days if what == "dek" else crypto.root_rotation_days
    return admin_record("seekgate", "internal", f"crypto.scheduled-rotate-{what}",
                        detail=f"every {days:g} days (crypto.{what}_rotation_days)",
                        before={what: before}, after={what: after})


def publish_s(settings: Settings) -> float:
    """How long a new pepper waits before hashing: every process reloads within one refresh interval."""
    return 3 * settings.crypto.refresh_interval_s


def _due(last: float | None, days: float, now: float) -> bool:
    return days > 0 and last is not None and now >= last + days * DAY_S


def _due_at(last: float | None, days: float) -> float | None:
    return None if last is None or days <= 0 else last + days * DAY_S
