"""Key lifecycle shared by the CLI and the admin API: rotate with grace, leak response, expiry warning."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from proxy.audit import pg_index
from proxy.audit.writer import query_audit as query_sqlite
from proxy.errors import AuditUnavailable
from proxy.keys.issue import ISSUABLE_TIERS, MAX_AUDITED_KEYS, ExpiresIn, iso_utc, key_status, new_key
from proxy.store import KeyRecord, KeyStore, StoreConflict

# A report lists every use, but a key hammered for months would make it unreadable; the
# aggregates (ips, models, tokens) always cover everything, the event list stops here.
MAX_REPORT_EVENTS = 10_000
# Read from the audit index per key; more than this and the report says it is truncated.
MAX_AUDIT_ROWS = 1_000_000
# How long the leak report waits for the audit writer to persist the uses queued before the revocation.
AUDIT_FLUSH_TIMEOUT_S = 10.0
_EVENT_FIELDS = ("timestamp", "key_id", "tier", "parent_key_ids", "client_ip", "model", "action",
                 "status", "http_status", "input_tokens", "output_tokens", "protocol", "path")


class LifecycleError(ValueError):
    """A refused lifecycle operation; the admin API answers 404 if `not_found`, 409 if `conflict`, else 400.

    `conflict`: the key's state forbids it (a key already rotated is not rotated again), nothing changed.
    """

    def __init__(self, message: str, not_found: bool = False, conflict: bool = False) -> None:
        super().__init__(message)
        self.not_found, self.conflict = not_found, conflict


class AuditFlush(Protocol):
    """The audit writer, as the leak report needs it (proxy.audit.writer.AuditWriter)."""

    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Rotation:
    old: KeyRecord          # as stored after the rotation (expiry brought forward)
    new: KeyRecord
    token: str              # the successor's plaintext key, shown once
    moved: tuple[str, ...] = ()   # device keys re-parented from the old app key to the successor


@dataclass(frozen=True, slots=True)
class Compromise:
    revoked: list[str]      # the leaked key and its subtree
    new: KeyRecord
    token: str              # the replacement's plaintext key, shown once
    report: dict[str, Any]
    report_path: Path


async def _get(store: KeyStore, key_id: str) -> KeyRecord:
    rec = await store.get_key(key_id)
    if rec is None:
        raise LifecycleError(f"key {key_id!r} not found", not_found=True)
    if rec.tier not in ISSUABLE_TIERS:
        raise LifecycleError(f"{rec.tier} keys cannot be rotated or replaced")
    return rec


async def _successor(store: KeyStore, pepper: bytes, rec: KeyRecord, now: float
                     ) -> tuple[KeyRecord, str]:
    """A new key with the same scope: tier, owner, roles, labels, models, CIDRs, parent, limits; not stored yet.

    It gets as long a life as the old key was given (never, if it never expired); a device's
    is still clamped to its parent's expiry by new_key.
    """
    lifetime: ExpiresIn = None if rec.expires_at is None else max(1.0, rec.expires_at - rec.created_at)
    try:
        return await new_key(store, pepper, tier=rec.tier, owner=rec.owner, roles=rec.roles,
                             labels=rec.labels, models=rec.models, allowed_cidrs=rec.allowed_cidrs,
                             parent_id=rec.parent_id, expires_in_s=lifetime, limits=rec.limits,
                             now=now)
    except ValueError as exc:
        raise _not_issued(rec, exc) from None


def _not_issued(rec: KeyRecord, exc: ValueError) -> LifecycleError:
    """The refusal when `rec`'s successor can't be made or stored (StoreConflict is a ValueError)."""
    return LifecycleError(f"cannot issue a successor for {rec.key_id}: {exc}")


async def rotate_key(store: KeyStore, pepper: bytes, key_id: str, grace_s: float, *,
                     now: float) -> Rotation:
    """Issue a successor with the same scope; the old key works until now + grace, then never.

    The old key's expiry is only ever brought forward: a key due to expire before the grace
    ends keeps its earlier expiry. Refused for a revoked or expired key.

    All or nothing: the successor is stored, recorded as the old key's successor, given the old
    key's devices, and the old key's expiry brought forward in one store transaction
    (KeyStore.rotate). If the store fails part-way (StoreUnavailable), nothing is left behind, no
    successor whose secret nobody was shown, so the same rotation can simply be retried.

    A key is rotated once: the old key records its successor, and rotating it again while it is
    in its grace is refused (`conflict`, nothing changed) with a message naming the successor to
    rotate instead, as a second successor would leave two live credentials and the operator
    unsure which one the clients hold. Two rotations of one key at once: the store's claim lets
    one win; the other's successor, never shown to anyone, is never stored either.

    Rotating an app key rotates the app's credential, not its devices: the unrevoked device
    keys under it are re-parented to the successor at once, so they keep working through and
    after the grace, bounded from now on by the successor's scope, limits and expiry (the same
    scope the old key had, and an expiry no earlier than the old one, so a device never outlives
    its parent). Revoking the successor revokes them; revoking the old key after the rotation
    does not, since they are no longer under it. A leaked app key is not rotated but revoked
    with `compromise_key`, which revokes its devices too.
    """
    if not grace_s >= 0:
        raise LifecycleError(f"grace must be zero or more seconds, got {grace_s!r}")
    rec = await _get(store, key_id)
    status = key_status(rec, now)
    if status != "active":
        raise LifecycleError(f"key {key_id} is {status}: nothing to rotate")
    if rec.successor_id is not None:
        raise await _rotated_already(store, rec, rec.successor_id, now)
    new, token = await _successor(store, pepper, rec, now)
    done = await store.rotate(key_id, new, now + grace_s, move_children=rec.tier == "app")
    if done.earlier is not None:   # another rotation of this key won the race: its successor stands
        raise await _rotated_already(store, rec, done.earlier, now)
    old = await store.get_key(key_id)
    assert old is not None
    return Rotation(old, new, token, done.moved)


async def _rotated_already(store: KeyStore, rec: KeyRecord, successor_id: str, now: float) -> LifecycleError:
    """The refusal of a second rotation: which key succeeded `rec`, and what to do instead."""
    old = await store.get_key(rec.key_id) or rec   # as stored now: the grace end the first rotation set
    until = iso_utc(old.expires_at) or "never"
    message = f"key {rec.key_id} was already rotated: its successor is {successor_id} ({rec.key_id} works until {until})"
    successor = await store.get_key(successor_id)
    status = "missing" if successor is None else key_status(successor, now)
    if status == "active":
        message += f"; to rotate again, rotate {successor_id}"
    else:
        message += f"; {successor_id} is {status}: issue a new key with the same scope instead"
    return LifecycleError(message, conflict=True)


async def subtree_records(store: KeyStore, key_id: str) -> list[KeyRecord]:
    """`key_id` and every key under it as stored now, breadth first (an audit record's before/after).

    Walked down through the parent index one level at a time, a query per level, so the cost is the
    subtree's depth in round trips and its size in rows, never the fleet's.
    """
    root = await store.get_key(key_id)
    if root is None:
        return []
    out, seen, level = [root], {key_id}, [key_id]
    while level:
        # The whole level in one query (10k devices: one round trip, not 10k), then put back in
        # breadth-first order: by parent as the level lists them, each parent's children oldest first.
        under: dict[str | None, list[KeyRecord]] = {}
        for child in await store.children(level):
            under.setdefault(child.parent_id, []).append(child)
        below: list[str] = []
        for parent in level:
            for child in under.get(parent, []):
                if child.key_id not in seen:   # a parent cycle in a hand-edited database must not loop
                    seen.add(child.key_id)
                    out.append(child)
                    below.append(child.key_id)
        level = below
    return out


async def key_and_children(store: KeyStore, key_id: str) -> list[KeyRecord]:
    """`key_id` and its direct children: what a rotation changes (an app key's devices move)."""
    rec = await store.get_key(key_id)
    return [] if rec is None else [rec, *await store.children([key_id])]


async def records_of(store: KeyStore, ids: Iterable[str]) -> list[KeyRecord | None]:
    """The stored records of `ids`, at most MAX_AUDITED_KEYS of them (an audit record's `after`)."""
    return [await store.get_key(i) for i in list(ids)[:MAX_AUDITED_KEYS]]


async def compromise_key(store: KeyStore, pepper: bytes, data_dir: Path, key_id: str, *,
                         now: float, actor: str | None = None, audit: AuditFlush | None = None,
                         flush_timeout_s: float = AUDIT_FLUSH_TIMEOUT_S) -> Compromise:
    """Leak response: revoke the key and its subtree first, then replace it, then report its use.

    The revocation comes first so the leaked credential stops working before anything slower
    runs. The report (every audited use of the key and its subtree since the key was created)
    is also written as JSON under `<data_dir>/reports/`. `audit`: this process's audit writer,
    flushed before the report reads the log so that uses up to the revocation are in it
    (`audit_flushed` in the report says whether that finished within `flush_timeout_s`).
    """
    rec = await _get(store, key_id)
    await store.revoke_key(key_id, now)
    ids = [r.key_id for r in await subtree_records(store, key_id)]
    new, token = await _successor(store, pepper, rec, now)
    try:
        await store.create_key(new)
    except StoreConflict as exc:
        raise _not_issued(rec, exc) from None
    flushed: bool | None = None   # None: no writer in this process (the CLI); the server's may lag
    if audit is not None:
        try:
            async with asyncio.timeout(flush_timeout_s):
                await audit.flush()
            flushed = True
        except (TimeoutError, AuditUnavailable):   # the log is failing; the report says what it holds
            flushed = False
    pool = pg_index.pool_of(store)
    report = await usage_report(Path(data_dir), rec, ids, now=now, pool=pool)
    report.update({"replacement_key_id": new.key_id, "revoked": ids, "actor": actor,
                   "audit_flushed": flushed})
    if pool is not None:
        # Every replica's uses are in the shared index but for what the others still hold: say how much.
        report["audit_lag"] = await pg_index.lag(pool, time.time())
    path = await asyncio.to_thread(write_report, Path(data_dir), key_id, report, now)
    return Compromise(ids, new, token, report, path)


async def usage_report(data_dir: Path, rec: KeyRecord, key_ids: list[str], *, now: float,
                       pool: Any | None = None) -> dict[str, Any]:
    """Every audited use of `key_ids` since `rec` was created: aggregates plus the events, oldest first.

    A use counts when it was made with one of the keys or by a principal under one of them
    (a session minted from it, a device of it: `parent_key_ids` in the record), so sessions,
    which are not stored keys, are covered, and so are a device's uses from before a rotation
    moved it elsewhere. `pool`: read the index every replica shares, not this one's.
    """
    async def query_audit(data_dir: Path, **kw: Any) -> list[dict[str, Any]]:
        return await (pg_index.query(pool, **kw) if pool is not None else query_sqlite(data_dir, **kw))
    by_event: dict[str, dict[str, Any]] = {}
    truncated = False
    for kid in key_ids:
        own = await query_audit(data_dir, key_id=kid, since=rec.created_at, limit=MAX_AUDIT_ROWS)
        under = await query_audit(data_dir, ancestor=kid, since=rec.created_at, limit=MAX_AUDIT_ROWS)
        for got in (own, under):
            truncated |= len(got) >= MAX_AUDIT_ROWS
            by_event.update((str(r["event_id"]), r) for r in got)
    rows = list(by_event.values())
    rows.sort(key=lambda r: str(r.get("timestamp")))
    ips: Counter[str] = Counter(str(r["client_ip"]) for r in rows if r.get("client_ip"))
    models: Counter[str] = Counter(str(r["model"]) for r in rows if r.get("model"))
    statuses: Counter[str] = Counter(str(r["status"]) for r in rows if r.get("status"))
    per_key: Counter[str] = Counter(str(r["key_id"]) for r in rows)
    events = [{f: r.get(f) for f in _EVENT_FIELDS} for r in rows[:MAX_REPORT_EVENTS]]
    return {
        "key_id": rec.key_id, "tier": rec.tier, "owner": rec.owner,
        "key_created_at": iso_utc(rec.created_at), "generated_at": iso_utc(now),
        "keys": key_ids, "uses": len(rows),
        "uses_by_key": dict(per_key), "by_status": dict(statuses),
        "first_use": rows[0]["timestamp"] if rows else None,
        "last_use": rows[-1]["timestamp"] if rows else None,
        "client_ips": dict(ips.most_common()), "models": dict(models.most_common()),
        "tokens": {"input": sum(int(r.get("input_tokens") or 0) for r in rows),
                   "output": sum(int(r.get("output_tokens") or 0) for r in rows)},
        "events": events, "events_truncated": truncated or len(rows) > MAX_REPORT_EVENTS,
    }


def write_report(data_dir: Path, key_id: str, report: dict[str, Any], now: float) -> Path:
    """<data_dir>/reports/compromised-<key id>-<epoch ms>.json, readable by the owner only."""
    directory = Path(data_dir) / "reports"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"compromised-{key_id}-{int(now * 1000)}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")
    return path
