"""Reads over the audit index for the admin API and the console: filtered search, one record, usage, overview.

Each takes `pool`: given (store.url on PostgreSQL, pg_index.pool_of), it reads the index every
replica writes, so a console on any replica counts every replica's requests; None (one node),
this data dir's SQLite index.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from . import pg_index
from .index import ENDPOINT_CLAUSE, FIELDS, _decoded

# The filters a search takes, each an equality on one column; `owner` is the actor column, `protocol`
# the API used (http, grpc, openai), `endpoint` the OpenAI endpoint (/v1/chat/completions, ...).
EQUALITY_FILTERS = {"key_id": "key_id = ?", "owner": "actor = ?", "model": "model = ?", "status": "status = ?",
                    "client_ip": "client_ip = ?", "tier": "tier = ?", "resource": "resource = ?",
                    "protocol": "protocol = ?", "endpoint": ENDPOINT_CLAUSE}
MAX_PAGE = 500
EXPORT_BATCH = 1000   # records an export reads from the index at a time (and sends as one chunk)
GROUPS = {"key": "key_id", "owner": "actor", "model": "model"}
PERIODS = {"day": "%Y-%m-%d", "month": "%Y-%m"}


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """One search: equality filters, a reason prefix, a time range [since, until) in epoch seconds, a page."""

    equals: tuple[tuple[str, str], ...] = ()
    reason: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 50
    offset: int = 0

    def where(self, endpoint_clause: str = ENDPOINT_CLAUSE) -> tuple[str, list[Any]]:
        """The WHERE clause (`?` marks) and its values; `endpoint_clause` in the index's SQL dialect."""
        clauses: list[str] = []
        args: list[Any] = []
        for name, value in self.equals:
            clauses.append(endpoint_clause if name == "endpoint" else EQUALITY_FILTERS[name])
            args.append(value)
        if self.reason is not None:
            # A prefix: reasons carry detail after a colon (rate_limited:rpm, body_too_large: 9000).
            clauses.append("substr(reason, 1, ?) = ?")
            args += [len(self.reason), self.reason]
        for clause, bound in (("ts >= ?", self.since), ("ts < ?", self.until)):
            if bound is not None:
                clauses.append(clause)
                args.append(bound)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


@asynccontextmanager
async def _reader(data_dir: Path) -> AsyncIterator[tuple[aiosqlite.Connection, str] | None]:
    """A read-only connection and the column list (missing newer columns read as NULL), or None: no index yet."""
    db_path = Path(data_dir) / "audit" / "audit.db"
    if not db_path.exists():
        yield None
        return
    async with aiosqlite.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True) as db:
        async with db.execute("PRAGMA table_info(audit)") as cur:
            have = {r[1] for r in await cur.fetchall()}
        yield db, ", ".join(f if f in have else f"NULL AS {f}" for f in FIELDS)


async def search(data_dir: Path, query: AuditQuery, pool: Any | None = None) -> tuple[list[dict[str, Any]], int]:
    """One page of matching records, newest first, and how many match in all (every replica's, given `pool`)."""
    if pool is not None:
        return await pg_index.search(pool, *query.where(pg_index.ENDPOINT_CLAUSE), query.limit, query.offset)
    async with _reader(data_dir) as opened:
        if opened is None:
            return [], 0
        db, columns = opened
        if _lacks_endpoints(columns, query):
            return [], 0
        where, args = query.where()
        async with db.execute(f"SELECT count(*) FROM audit{where}", args) as cur:
            total = (await cur.fetchone() or (0,))[0]
        sql = f"SELECT {columns} FROM audit{where} ORDER BY ts DESC, rowid DESC LIMIT ? OFFSET ?"
        async with db.execute(sql, (*args, query.limit, query.offset)) as cur:
            rows = [_decoded(dict(zip(FIELDS, r, strict=True))) for r in await cur.fetchall()]
    return rows, total


async def count(data_dir: Path, query: AuditQuery, pool: Any | None = None) -> int:
    """How many records match `query` in all (every replica's, given `pool`); its page aside."""
    if pool is not None:
        return await pg_index.count(pool, *query.where(pg_index.ENDPOINT_CLAUSE))
    async with _reader(data_dir) as opened:
        if opened is None or _lacks_endpoints(opened[1], query):
            return 0
        where, args = query.where()
        async with opened[0].execute(f"SELECT count(*) FROM audit{where}", args) as cur:
            return int((await cur.fetchone() or (0,))[0])


async def export(data_dir: Path, query: AuditQuery, pool: Any | None = None, batch: int = EXPORT_BATCH
                 ) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The records `search` pages through for `query`, newest first: from its offset, at most its limit,
    `batch` at a time (an export of 100000 is never in memory at once).

    Each batch after the first resumes below the last record sent, (ts, rowid) here and (ts, event_id)
    on PostgreSQL, in a read of its own: a slow download holds no snapshot and no pooled connection, and
    records indexed meanwhile (newer than any sent) neither repeat nor push older ones out.
    """
    if pool is not None:
        async for rows in pg_index.export(pool, *query.where(pg_index.ENDPOINT_CLAUSE), query.limit,
                                          query.offset, batch):
            yield rows
        return
    async with _reader(data_dir) as opened:
        if opened is None or _lacks_endpoints(opened[1], query):
            return
        db, columns = opened
        where, args = query.where()
        left, offset, after = query.limit, query.offset, ()
        while left > 0:
            # `ts <= ?` alone lets the audit_ts index serve the range; the row value breaks ts ties.
            resume = ((" AND " if where else " WHERE ") + "ts <= ? AND (ts, rowid) < (?, ?)") if after else ""
            sql = (f"SELECT {columns}, ts, rowid FROM audit{where}{resume} "
                   "ORDER BY ts DESC, rowid DESC LIMIT ? OFFSET ?")
            async with db.execute(sql, (*args, *after, min(batch, left), offset)) as cur:
                found = list(await cur.fetchall())
            if not found:
                return
            yield [_decoded(dict(zip(FIELDS, r[:-2], strict=True))) for r in found]
            left, offset, after = left - len(found), 0, (found[-1][-2], *found[-1][-2:])


def _lacks_endpoints(columns: str, query: AuditQuery) -> bool:
    """An index no writer has opened since the openai column came: no record has an endpoint to match."""
    return "NULL AS openai" in columns and any(name == "endpoint" for name, _ in query.equals)


async def record(data_dir: Path, event_id: str, pool: Any | None = None) -> dict[str, Any] | None:
    if pool is not None:
        return await pg_index.record(pool, event_id)
    async with _reader(data_dir) as opened:
        if opened is None:
            return None
        db, columns = opened
        async with db.execute(f"SELECT {columns} FROM audit WHERE event_id = ?", (event_id,)) as cur:
            found = await cur.fetchone()
    return None if found is None else _decoded(dict(zip(FIELDS, found, strict=True)))


async def usage(data_dir: Path, group: str, period: str, since: float, pool: Any | None = None
                ) -> list[dict[str, Any]]:
    """Tokens and requests per (group value, day or month) of served requests since `since`, oldest first."""
    column, fmt = GROUPS[group], PERIODS[period]
    if pool is not None:
        found = await pg_index.usage(pool, column, fmt, since)
    else:
        async with _reader(data_dir) as opened:
            if opened is None:
                return []
            db, _ = opened
            sql = (f"SELECT {column}, strftime('{fmt}', ts, 'unixepoch') AS p, count(*),"
                   " coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0)"
                   f" FROM audit WHERE ts >= ? AND status = 'allowed' AND {column} IS NOT NULL"
                   f" GROUP BY {column}, p ORDER BY p, {column}")
            async with db.execute(sql, (since,)) as cur:
                found = [tuple(r) for r in await cur.fetchall()]
    return [{group: r[0], period: r[1], "requests": r[2], "input_tokens": r[3], "output_tokens": r[4],
             "tokens": r[3] + r[4]} for r in found]


_Tops = dict[str, list[tuple[Any, int, int]]]


async def overview(data_dir: Path, now: float | None = None, minutes: int = 60, days: int = 14,
                   top: int = 5, pool: Any | None = None) -> dict[str, Any]:
    """Requests and errors per minute (last `minutes`), tokens per day (last `days`), top keys and models today."""
    now = time.time() if now is None else now
    start_min = (int(now) // 60 - minutes + 1) * 60
    start_day = (int(now) // 86400 - days + 1) * 86400
    today = int(now) // 86400 * 86400
    per_minute = {start_min + 60 * i: [0, 0] for i in range(minutes)}
    per_day = {start_day + 86400 * i: 0 for i in range(days)}
    read = pg_index.overview(pool, start_min, start_day, today, top) if pool is not None \
        else _overview_sqlite(data_dir, start_min, start_day, today, top)
    minute_rows, day_rows, tops = await read
    for minute, count, errors in minute_rows:
        if minute in per_minute:
            per_minute[minute] = [count, errors]
    for day, tokens in day_rows:
        if day in per_day:
            per_day[day] = tokens
    return {"per_minute": [{"t": t, "requests": c, "errors": e} for t, (c, e) in per_minute.items()],
            "tokens_per_day": [{"t": t, "tokens": n} for t, n in per_day.items()],
            "top_keys": [{"name": n, "requests": c, "tokens": t} for n, c, t in tops.get("key_id", [])],
            "top_models": [{"name": n, "requests": c, "tokens": t} for n, c, t in tops.get("model", [])]}


async def _overview_sqlite(data_dir: Path, start_min: int, start_day: int, today: int, top: int
                           ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], _Tops]:
    """pg_index.overview over this node's SQLite index."""
    minutes: list[tuple[int, int, int]] = []
    days: list[tuple[int, int]] = []
    tops: _Tops = {}
    async with _reader(data_dir) as opened:
        if opened is None:
            return minutes, days, tops
        db, _ = opened
        async with db.execute("SELECT CAST(ts / 60 AS INTEGER) * 60, count(*),"
                              " sum(status != 'allowed') FROM audit WHERE ts >= ? GROUP BY 1",
                              (start_min,)) as cur:
            minutes = [(minute, count, errors or 0) for minute, count, errors in await cur.fetchall()]
        async with db.execute("SELECT CAST(ts / 86400 AS INTEGER) * 86400,"
                              " coalesce(sum(input_tokens), 0) + coalesce(sum(output_tokens), 0)"
                              " FROM audit WHERE ts >= ? GROUP BY 1", (start_day,)) as cur:
            days = [(day, tokens) for day, tokens in await cur.fetchall()]
        for column in ("key_id", "model"):
            async with db.execute(f"SELECT {column}, count(*), coalesce(sum(input_tokens), 0)"
                                  f" + coalesce(sum(output_tokens), 0) FROM audit WHERE ts >= ?"
                                  f" AND {column} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC LIMIT ?",
                                  (today, top)) as cur:
                tops[column] = [(r[0], r[1], r[2]) for r in await cur.fetchall()]
    return minutes, days, tops


# The admin actions that mint a session token (admin/sessions.py, the console's sign-in).
MINT_ACTIONS = ("sessions.mint", "console.signin")


async def minted_sessions(data_dir: Path, key_id: str, since: float, pool: Any | None = None
                          ) -> list[dict[str, Any]]:
    """The sessions `key_id` minted since `since` (epoch seconds), newest first: {jti, minted_at, via}.

    Session tokens are not stored anywhere but in their holders' hands; their mint records are
    the only list of them there is (every replica's, given `pool`).
    """
    if pool is not None:
        return await pg_index.minted_sessions(pool, key_id, since, MINT_ACTIONS)
    async with _reader(data_dir) as opened:
        if opened is None:
            return []
        db, columns = opened
        if "NULL AS admin" in columns:
            return []   # an index no writer has opened since the column came: no mint is in it
        sql = ("SELECT ts, json_extract(admin, '$.target'), json_extract(admin, '$.action') FROM audit"
               " WHERE key_id = ? AND ts >= ? AND status = 'allowed'"
               f" AND json_extract(admin, '$.action') IN ({', '.join('?' * len(MINT_ACTIONS))})"
               " ORDER BY ts DESC, rowid DESC LIMIT 1000")
        async with db.execute(sql, (key_id, since, *MINT_ACTIONS)) as cur:
            return [{"jti": jti, "minted_at": ts, "via": via} for ts, jti, via in await cur.fetchall()
                    if isinstance(jti, str)]
