"""One KeyRecord as a row and back, shared by the SQLite and PostgreSQL stores.

JSON columns are checked on the way out: a hand-edited or corrupt row raises ValueError,
which each store turns into StoreUnavailable (fail closed), never a half-built record.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.store import KeyRecord

# Chains are app->device or user->session; anything deeper is corruption, and the cap
# also stops a parent cycle in a hand-edited database from looping forever.
MAX_DEPTH = 16

COLUMNS = ("key_id, secret_hash, tier, owner, roles, labels, models, allowed_cidrs, "
           "parent_id, prefix, last4, created_at, expires_at, revoked_at, limits, pepper_version, successor_id")


def to_row(rec: KeyRecord) -> tuple[Any, ...]:
    return (rec.key_id, rec.secret_hash, rec.tier, rec.owner,
            json.dumps(list(rec.roles)), json.dumps(dict(rec.labels), sort_keys=True),
            json.dumps(list(rec.models)), json.dumps(list(rec.allowed_cidrs)),
            rec.parent_id, rec.prefix, rec.last4, rec.created_at, rec.expires_at,
            rec.revoked_at, json.dumps(dict(rec.limits), sort_keys=True), rec.pepper_version,
            rec.successor_id)


def _str_tuple(raw: str) -> tuple[str, ...]:
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a JSON array of strings, got {raw!r}")
    return tuple(value)


def from_row(row: Any) -> KeyRecord:
    labels = json.loads(row[5])
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError(f"expected a JSON object of strings, got {row[5]!r}")
    return KeyRecord(
        key_id=row[0], secret_hash=row[1], tier=row[2], owner=row[3],
        roles=_str_tuple(row[4]), labels=labels, models=_str_tuple(row[6]),
        allowed_cidrs=_str_tuple(row[7]), parent_id=row[8], prefix=row[9], last4=row[10],
        created_at=float(row[11]),
        expires_at=None if row[12] is None else float(row[12]),
        revoked_at=None if row[13] is None else float(row[13]),
        limits=_int_map(row[14]),
        pepper_version=int(row[15]),
        successor_id=row[16],
    )


def _int_map(raw: str) -> dict[str, int]:
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()):
        raise ValueError(f"expected a JSON object of integers, got {raw!r}")
    return value



def page_clauses(after: str | None, expiring: tuple[float, float] | None,
                 numbered: bool = False) -> tuple[str, list[Any]]:
    """The WHERE clause and values of one page of keys (KeyStore.page_keys): `?` marks, or `$n` if numbered."""
    clauses: list[str] = []
    args: list[Any] = []

    def mark(value: Any) -> str:
        args.append(value)
        return f"${len(args)}" if numbered else "?"

    if after is not None:
        clauses.append(f"key_id > {mark(after)}")
    if expiring is not None:
        clauses.append(f"revoked_at IS NULL AND expires_at > {mark(expiring[0])} AND expires_at <= {mark(expiring[1])}")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args
