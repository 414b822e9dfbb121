"""Expiry warnings: one `key_expiring` audit event per key and expiry, remembered in the store across restarts."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from proxy.keys.issue import iso_utc
from proxy.store import KeyRecord, KeyStore

log = logging.getLogger(__name__)

ACTION = "key_expiring"
Submit = Callable[[dict[str, Any]], None]   # AuditWriter.submit


def expiry_event(rec: KeyRecord, now: float) -> dict[str, Any]:
    """The audit record announcing `rec`'s expiry: ids, tier and time only, never the secret or its hash."""
    assert rec.expires_at is not None
    return {
        "timestamp": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "event_id": uuid.uuid4().hex,
        "request_id": None,
        "actor": "seekgate",            # no caller: the server's own check wrote it
        "key_id": rec.key_id,
        "tier": rec.tier,
        "action": ACTION,
        "resource": "admin:keys",
        "reason": f"expires_at {iso_utc(rec.expires_at)}",   # also in the indexed columns
        "expires_at": iso_utc(rec.expires_at),
        "expires_in_s": round(rec.expires_at - now, 3),
        "owner": rec.owner,
    }


async def announce_expiring(store: KeyStore, submit: Submit, window_s: float, now: float) -> list[KeyRecord]:
    """Audit every active key expiring within `window_s` whose current expiry was not announced yet.

    The store claims each (key, expiry) pair before the event is queued, so a restart, a second
    pass or another process sharing the store never repeats it; a new expiry (after a rotation
    brought it forward) is a new pair and is announced again. Returns the keys announced now.
    """
    announced: list[KeyRecord] = []
    for rec in await store.list_expiring(window_s, now):
        assert rec.expires_at is not None
        if await store.claim_expiry_notice(rec.key_id, rec.expires_at, now):
            submit(expiry_event(rec, now))
            announced.append(rec)
    return announced


async def watch_expiry_events(store: KeyStore, submit: Submit, window_s: float, interval_s: float,
                              clock: Callable[[], float] = time.time) -> None:
    """announce_expiring at start and every `interval_s` until cancelled; a failed pass is retried next time."""
    while True:
        try:
            await announce_expiring(store, submit, window_s, clock())
        except Exception:   # a store hiccup must not end the loop
            log.exception("announcing expiring keys failed")
        await asyncio.sleep(interval_s)
