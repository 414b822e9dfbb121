"""The audit index in SQLite: schema, rows, connection settings, and `seekgate audit query`."""

from __future__ import annotations

import json
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import aiosqlite

# Order is the JSONL key order and the SQLite column order; never add a credential here.
FIELDS: tuple[str, ...] = (
    "timestamp", "event_id", "request_id", "actor", "key_id", "tier", "action", "resource",
    "model", "status", "http_status", "reason", "client_ip", "duration_ms", "upstream_ms",
    "input_tokens", "output_tokens", "protocol", "method", "path", "rule",
)
_INT_FIELDS = {"http_status", "input_tokens", "output_tokens"}
_REAL_FIELDS = {"duration_ms", "upstream_ms"}

_COLUMNS = ", ".join(
    f"{f} {'INTEGER' if f in _INT_FIELDS else 'REAL' if f in _REAL_FIELDS else 'TEXT'}"
    + (" PRIMARY KEY" if f == "event_id" else "")
    for f in FIELDS
)
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS audit (ts REAL NOT NULL, {_COLUMNS})",
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts)",
    "CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor, ts)",
    "CREATE INDEX IF NOT EXISTS audit_key_id ON audit (key_id, ts)",
)
# OR IGNORE makes a retried batch idempotent: event_id is the primary key.
INSERT = (f"INSERT OR IGNORE INTO audit (ts, {', '.join(FIELDS)}) "
           f"VALUES ({', '.join('?' * (len(FIELDS) + 1))})")


def _epoch(iso: str) -> float:
    if len(iso) == 24 and iso[19] == "." and iso[23] == "Z" and iso[20:23].isdigit():
        # The shape build_record writes: the second parsed once per second, the milliseconds added.
        return _second(iso[:19]) + int(iso[20:23]) / 1000.0
    # fromisoformat only accepts "Z" from 3.11; the project still declares 3.10.
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@lru_cache(maxsize=8)
def _second(iso_seconds: str) -> float:
    return datetime.fromisoformat(iso_seconds + "+00:00").timestamp()


_PLAIN = (str, int, float, type(None))


def row(rec: dict[str, Any]) -> tuple[Any, ...]:
    try:
        ts = _epoch(str(rec["timestamp"]))
    except (KeyError, ValueError):  # a malformed record must not wedge the writer in retries
        ts = time.time()
    return (ts, *[v if isinstance(v, _PLAIN) else json.dumps(v, default=str) for v in map(rec.get, FIELDS)])



async def connect(db_path: Path) -> aiosqlite.Connection:
    """The writer's connection, schema created.

    WAL with synchronous=NORMAL survives a process crash; a host crash can lose the last commits,
    which is why the fsynced JSONL file, not this index, is the durable record: the writer
    re-indexes the file's tail at start. A second fsync per group commit would cost strict mode
    throughput for nothing.
    """
    db = await aiosqlite.connect(db_path)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        for stmt in _SCHEMA:
            await db.execute(stmt)
        await db.commit()
    except BaseException:
        await db.close()
        raise
    return db


async def query_audit(data_dir: Path, actor: str | None = None, key_id: str | None = None,
                      since: float | None = None, until: float | None = None,
                      status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Records matching every given filter, newest first. `since`/`until` are epoch seconds."""
    db_path = Path(data_dir) / "audit" / "audit.db"
    if not db_path.exists():
        return []
    where, args = [], []
    for clause, value in (("actor = ?", actor), ("key_id = ?", key_id), ("ts >= ?", since),
                          ("ts < ?", until), ("status = ?", status)):
        if value is not None:
            where.append(clause)
            args.append(value)
    sql = (f"SELECT {', '.join(FIELDS)} FROM audit"
           + (f" WHERE {' AND '.join(where)}" if where else "")
           + " ORDER BY ts DESC, rowid DESC LIMIT ?")
    async with aiosqlite.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True) as db:
        async with db.execute(sql, (*args, max(0, limit))) as cur:
            return [dict(zip(FIELDS, row)) for row in await cur.fetchall()]
