"""The audit index every replica shares in PostgreSQL: batched off the hot path, monthly partitions, lag per replica.

Each replica's JSONL file stays the durable record; this index is what `audit query`, the admin
search and the leak report read when `store.url` is PostgreSQL, so they see every replica's
records. The indexer holds what it could not write yet in memory (bounded) and retries, so a
PostgreSQL outage never stops the JSONL writer, and never refuses a request; past the bound it
re-reads the JSONL tail once the server is back (rows are keyed by event_id, so nothing doubles).
How many records are still unindexed is kept in a small file beside the JSONL (`mark`) after every
attempt, so a replica stopped or killed during an outage re-reads that many at its next start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg

from ..store.postgres import PostgresStore
from .index import _INT_FIELDS, _JSON_FIELDS, _REAL_FIELDS, FIELDS, _decoded, row

log = logging.getLogger(__name__)

BATCH = 500
MAX_PENDING = 200_000          # records held in memory while PostgreSQL is away; more are re-read from JSONL
HEARTBEAT_S = 1.0              # how often an idle indexer reports its (empty) queue
REPORT_S = 0.5                 # under load, the queue is reported at most this often, or when it empties
STEP_S = 0.2                   # batches start at most this often: one INSERT (and one commit) carries them all
RETRY_S = (0.2, 5.0)
MARK_S = 0.5                   # while backing off, the unindexed count is written at least this often
# Retention works on these: a partition whose whole month is past the cutoff is dropped, not deleted row by row.
_PARTITION_LOCK = 0x7365656B61756474   # "seekaudt": serialises partition DDL between replicas

ENDPOINT_CLAUSE = "openai->>'endpoint' = ?"   # search.AuditQuery's endpoint filter, in PostgreSQL's JSON syntax
_CASTS = ["float8"] + ["int4" if f in _INT_FIELDS else "float8" if f in _REAL_FIELDS else "text" for f in FIELDS]
_COLUMNS = ", ".join(("ts", *FIELDS))
_INSERT = (f"INSERT INTO audit_events ({_COLUMNS}, replica) SELECT "
           + ", ".join(f"c{i}::jsonb" if f in _JSON_FIELDS else f"c{i}" for i, f in enumerate(("ts", *FIELDS)))
           + f", ${len(_CASTS) + 1} FROM unnest("
           + ", ".join(f"${i + 1}::{c}[]" for i, c in enumerate(_CASTS))
           + ") AS t(" + ", ".join(f"c{i}" for i in range(len(_CASTS))) + ") ON CONFLICT DO NOTHING")
_HEARTBEAT = ("INSERT INTO audit_replicas (replica, pending, oldest_pending, indexed_at, heartbeat) "
              "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (replica) DO UPDATE SET pending = $2, oldest_pending = $3, "
              "indexed_at = coalesce($4, audit_replicas.indexed_at), heartbeat = $5")


def pool_of(store: object) -> Any | None:
    """The pool whose audit_events every reader should use, or None: the store is SQLite, read this replica's index."""
    return store.pool if isinstance(store, PostgresStore) else None


def replica_name(data_dir: Path) -> str:
    """Stable across restarts (host and data dir), so a restarted replica's lag row is its own again."""
    return f"{socket.gethostname()}:{Path(data_dir).resolve()}"


def _month(ts: float) -> tuple[float, float, str]:
    """The partition holding `ts`: [first second of its month, first of the next) and its table name."""
    d = datetime.fromtimestamp(ts, timezone.utc)
    lo = datetime(d.year, d.month, 1, tzinfo=timezone.utc)
    hi = datetime(d.year + d.month // 12, d.month % 12 + 1, 1, tzinfo=timezone.utc)
    return lo.timestamp(), hi.timestamp(), f"audit_events_{d.year:04d}{d.month:02d}"


def _cell(field: str, value: Any) -> Any:
    """A value asyncpg binds into the column's array type; what does not fit becomes text or NULL."""
    if value is None:
        return None
    if field in _INT_FIELDS:
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if field in _REAL_FIELDS:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if field in _JSON_FIELDS:
        # jsonb refuses the escape \u0000 (and text a NUL): one such record would fail its whole batch.
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        return text.replace("\\u0000", "\\ufffd")
    text = value if isinstance(value, str) else str(value)
    return text.replace("\x00", "\ufffd")


def _column(field: str, values: tuple[Any, ...]) -> list[Any]:
    """One column's values as _cell makes them; the common case (already the column's type) passes
    as it is, so a batch costs a comprehension per column rather than a call per value."""
    if field in _JSON_FIELDS:
        return [_cell(field, v) for v in values]
    if field in _INT_FIELDS:
        return [v if v.__class__ is int or v is None else _cell(field, v) for v in values]
    if field in _REAL_FIELDS:
        return [v if v.__class__ is float or v is None else _cell(field, v) for v in values]
    return [v if v is None or (v.__class__ is str and "\x00" not in v) else _cell(field, v) for v in values]


def columns(records: list[dict[str, Any]]) -> list[list[Any]]:
    """Records as one array per column (ts first), for the single INSERT ... unnest of a batch."""
    if not records:
        return [[] for _ in range(len(FIELDS) + 1)]
    by_column = list(zip(*(row(r) for r in records), strict=True))
    return [list(by_column[0])] + [_column(f, by_column[i + 1]) for i, f in enumerate(FIELDS)]


class SharedAuditIndex:
    """One replica's indexer into audit_events. `start()`, `submit()` after each JSONL write, `flush()`, `close()`."""

    def __init__(self, pool: Any, replica: str, reread: Callable[[int], list[dict[str, Any]]] | None = None,
                 mark: Path | None = None) -> None:
        self.pool, self.replica = pool, replica
        self._mark = mark                  # where the count of unindexed records outlives this process
        self._marked = -1                  # the count last written there
        self.unindexed_at_start = 0        # the count the previous process left: re-read at start
        self._reread = reread              # the JSONL tail, for catching up past MAX_PENDING
        self._pending: deque[dict[str, Any]] = deque()
        self._submitted = 0                # records ever submitted; _indexed trails it
        self._indexed = 0
        self._overflowed = 0               # records dropped from memory (still in the JSONL) since the last catch-up
        self._progress = asyncio.Event()
        self._wake = asyncio.Event()
        self._months: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.healthy = True
        self.last_indexed_at: float | None = None
        self._reported: tuple[float, int] = (0.0, -1)   # when the queue was last reported, and its length then

    def start(self) -> None:
        self.unindexed_at_start = self._read_mark()
        self._task = asyncio.create_task(self._run(), name="audit-shared-index")

    def submit(self, records: list[dict[str, Any]]) -> None:
        """Queue records already in the JSONL file; never blocks."""
        self._pending.extend(records)
        self._submitted += len(records)
        while len(self._pending) > MAX_PENDING:
            self._pending.popleft()
            self._indexed += 1            # counted as done for flush(); the catch-up re-reads it
            self._overflowed += 1
        self._wake.set()

    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        """Wait until every record submitted before this call is in PostgreSQL (bound it with asyncio.timeout)."""
        target = self._submitted
        while self._indexed < target or self._overflowed:
            self._wake.set()
            await self._progress.wait()

    async def close(self, timeout: float = 5.0) -> None:
        """Index what is left if PostgreSQL answers within `timeout`; the JSONL file has the rest."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.flush()
        except TimeoutError:
            log.warning("shared audit index: %d records not indexed at close (the JSONL file has them)",
                        len(self._pending))
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self._write_mark()

    def _read_mark(self) -> int:
        try:
            return max(0, int(self._mark.read_text())) if self._mark is not None else 0
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:   # unreadable: the fixed tail a start re-reads is all we have
            log.error("shared audit index: unreadable mark %s (%s)", self._mark, exc)
            return 0

    def _write_mark(self) -> None:
        """Records not in PostgreSQL yet (the JSONL's last ones), for the next start; only when it changed."""
        waiting = len(self._pending) + self._overflowed
        if self._mark is None or waiting == self._marked:
            return
        try:
            tmp = self._mark.with_name(self._mark.name + ".tmp")
            tmp.write_text(str(waiting))
            os.replace(tmp, self._mark)
            self._marked = waiting
        except OSError as exc:
            log.error("shared audit index: could not write %s (%s)", self._mark, exc)

    async def _run(self) -> None:
        attempt = 0
        stepped = 0.0
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if (wait := stepped + STEP_S - time.monotonic()) > 0:
                await asyncio.sleep(wait)   # let a burst's records gather into one INSERT
            stepped = time.monotonic()
            self._wake.clear()
            try:
                await self._step()
                attempt, self.healthy = 0, True
                self._write_mark()
            except Exception as exc:   # asyncpg's InternalClientError too (a server shutting down): never end the loop
                self._write_mark()     # before the back-off: a process killed during it re-reads these
                attempt += 1
                if self.healthy or attempt % 20 == 0:
                    log.error("SHARED AUDIT INDEX FAILED (%s: %s, %d records waiting; the JSONL file has them)",
                              exc.__class__.__name__, exc, len(self._pending))
                self.healthy = False
                # The back-off is slept in steps, the mark kept current after each: records keep arriving
                # meanwhile (thousands a second), and a process killed late in a 5 s back-off would leave a
                # mark short by more than the fixed tail a start re-reads, and those records unindexed.
                until = time.monotonic() + min(RETRY_S[1], RETRY_S[0] * 2 ** min(attempt - 1, 8))
                while (left := until - time.monotonic()) > 0:
                    await asyncio.sleep(min(left, MARK_S))
                    self._write_mark()
            finally:
                self._progress.set()
                self._progress.clear()

    async def _step(self) -> None:
        """Catch up from the JSONL if memory overflowed, index the pending batches, report this replica's lag."""
        if self._overflowed and self._reread is not None:
            recs = await asyncio.to_thread(self._reread, MAX_PENDING + self._overflowed)
            for start in range(0, len(recs), BATCH):
                await self._insert(recs[start:start + BATCH])
            self._overflowed = 0
        elif self._overflowed:
            self._overflowed = 0
        while self._pending:
            batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
            try:
                await self._insert(batch)
            except asyncpg.DataError:
                # A record PostgreSQL refuses must not wedge every record behind it: the batch goes in
                # one by one, and what is still refused stays only in the JSONL file (the durable record).
                for rec in batch:
                    try:
                        await self._insert([rec])
                    except asyncpg.DataError as exc:
                        log.error("shared audit index: record %s refused (%s); the JSONL file has it",
                                  rec.get("event_id"), exc)
            for _ in batch:
                self._pending.popleft()
            self._indexed += len(batch)
            self.last_indexed_at = time.time()
        # Reported when it changed from what others last read, or at least every REPORT_S, not per batch.
        now, waiting = time.monotonic(), len(self._pending)
        if waiting == self._reported[1] and now - self._reported[0] < REPORT_S:
            return
        oldest = row(self._pending[0])[0] if self._pending else None
        async with self.pool.acquire() as conn:
            await conn.execute(_HEARTBEAT, self.replica, waiting, oldest, self.last_indexed_at, time.time())
        self._reported = (now, waiting)

    async def _insert(self, batch: list[dict[str, Any]]) -> None:
        cols = columns(batch)
        async with self.pool.acquire() as conn:
            for lo, hi, name in {_month(ts) for ts in cols[0]}:
                if name not in self._months:
                    await ensure_partition(conn, lo, hi, name)
                    self._months.add(name)
            await conn.execute(_INSERT, *cols, self.replica)


async def ensure_partition(conn: Any, lo: float, hi: float, name: str) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF audit_events "
                           f"FOR VALUES FROM ({lo!r}) TO ({hi!r})")


async def prune(pool: Any, cutoff: float) -> list[str]:
    """Retention: drop the month partitions wholly before `cutoff`, delete older rows from the one it falls in."""
    dropped: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
        names = await conn.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                 "WHERE i.inhparent = 'audit_events'::regclass")
        for (name,) in names:
            year, month = int(name[-6:-2]), int(name[-2:])
            if _month(datetime(year, month, 1, tzinfo=timezone.utc).timestamp())[1] <= cutoff:
                await conn.execute(f"DROP TABLE {name}")
                dropped.append(name)
        await conn.execute("DELETE FROM audit_events WHERE ts < $1", cutoff)
    return dropped


async def query(pool: Any, actor: str | None = None, key_id: str | None = None, since: float | None = None,
                until: float | None = None, status: str | None = None, limit: int = 100,
                ancestor: str | None = None, protocol: str | None = None,
                endpoint: str | None = None) -> list[dict[str, Any]]:
    """query_audit over the shared index: every replica's records matching every filter, newest first."""
    where, args = [], []
    for clause, value in (("actor = $", actor), ("key_id = $", key_id), ("ts >= $", since), ("ts < $", until),
                          ("status = $", status), ("parent_key_ids ? $", ancestor), ("protocol = $", protocol),
                          ("openai->>'endpoint' = $", endpoint)):
        if value is not None:
            args.append(value)
            where.append(f"{clause}{len(args)}")
    args.append(max(0, limit))
    sql = (f"SELECT {', '.join(FIELDS)} FROM audit_events" + (f" WHERE {' AND '.join(where)}" if where else "")
           + f" ORDER BY ts DESC, event_id DESC LIMIT ${len(args)}")
    async with pool.acquire() as conn:
        return [_decoded(dict(zip(FIELDS, r, strict=True))) for r in await conn.fetch(sql, *args)]


def _numbered(where: str) -> str:
    """An AuditQuery's WHERE, written with `?` marks, in asyncpg's $1, $2, ..."""
    parts = where.split("?")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))


async def count(pool: Any, where: str, args: list[Any]) -> int:
    """How many records an AuditQuery's WHERE matches."""
    async with pool.acquire() as conn:
        return int(await conn.fetchval(f"SELECT count(*) FROM audit_events{_numbered(where)}", *args))


async def export(pool: Any, where: str, args: list[Any], limit: int, offset: int, batch: int
                 ) -> AsyncIterator[list[dict[str, Any]]]:
    """search.export over the shared index: resumes below the last (ts, event_id) sent, a pool connection a batch."""
    after: tuple[float, str] | None = None
    while limit > 0:
        clause, values = where, list(args)
        if after is not None:
            # `ts <= ?` alone lets audit_events_ts serve the range; the row comparison breaks ts ties.
            clause += (" AND " if where else " WHERE ") + "ts <= ? AND (ts, event_id) < (?, ?)"
            values += [after[0], *after]
        n = len(values)
        async with pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM audit_events{_numbered(clause)} "
                                    f"ORDER BY ts DESC, event_id DESC LIMIT ${n + 1} OFFSET ${n + 2}",
                                    *values, min(batch, limit), offset)
        if not rows:
            return
        yield [_decoded(dict(zip(FIELDS, r[1:], strict=True))) for r in rows]
        limit, offset, after = limit - len(rows), 0, (rows[-1]["ts"], rows[-1]["event_id"])


async def search(pool: Any, where: str, args: list[Any], limit: int, offset: int
                 ) -> tuple[list[dict[str, Any]], int]:
    """One page and the total for an AuditQuery's WHERE (written with `?` marks, numbered here)."""
    numbered = _numbered(where)
    n = len(args)
    async with pool.acquire() as conn:
        total = int(await conn.fetchval(f"SELECT count(*) FROM audit_events{numbered}", *args))
        rows = await conn.fetch(f"SELECT {', '.join(FIELDS)} FROM audit_events{numbered} "
                                f"ORDER BY ts DESC, event_id DESC LIMIT ${n + 1} OFFSET ${n + 2}",
                                *args, limit, offset)
    return [_decoded(dict(zip(FIELDS, r, strict=True))) for r in rows], total


async def record(pool: Any, event_id: str) -> dict[str, Any] | None:
    async with pool.acquire() as conn:
        found = await conn.fetchrow(f"SELECT {', '.join(FIELDS)} FROM audit_events WHERE event_id = $1", event_id)
    return None if found is None else _decoded(dict(zip(FIELDS, found, strict=True)))


async def lag(pool: Any, now: float) -> list[dict[str, Any]]:
    """Each replica's indexing lag as it last reported it: records waiting, the oldest's age, the report's age."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT replica, pending, oldest_pending, indexed_at, heartbeat FROM audit_replicas "
                                'ORDER BY replica COLLATE "C"')
    return [{"replica": r["replica"], "pending": r["pending"],
             "oldest_pending_age_s": None if r["oldest_pending"] is None else round(now - r["oldest_pending"], 3),
             "last_report_age_s": round(now - r["heartbeat"], 3),
             # Silent for longer than a few heartbeats: down or cut off; its records are in its JSONL file.
             "reporting": now - r["heartbeat"] <= 5 * HEARTBEAT_S} for r in rows]


# The console's aggregates (search.usage, search.overview, search.minted_sessions) over every replica's
# records: the same answers as the SQLite queries of one node, in PostgreSQL's dialect.
_PERIOD_FORMATS = {"%Y-%m-%d": "YYYY-MM-DD", "%Y-%m": "YYYY-MM"}


async def usage(pool: Any, column: str, fmt: str, since: float) -> list[tuple[Any, str, int, int, int]]:
    """(group value, period, requests, input tokens, output tokens) of served requests since `since`.

    `column` is one of search.GROUPS' columns and `fmt` one of search.PERIODS' formats (never user text).
    """
    period = f"to_char(to_timestamp(ts) AT TIME ZONE 'UTC', '{_PERIOD_FORMATS[fmt]}')"
    sql = (f"SELECT {column}, {period} AS p, count(*), coalesce(sum(input_tokens), 0),"
           f" coalesce(sum(output_tokens), 0) FROM audit_events"
           f" WHERE ts >= $1 AND status = 'allowed' AND {column} IS NOT NULL"
           f' GROUP BY {column}, p ORDER BY p, {column} COLLATE "C"')
    async with pool.acquire() as conn:
        return [(r[0], r[1], int(r[2]), int(r[3]), int(r[4])) for r in await conn.fetch(sql, since)]


async def overview(pool: Any, start_min: int, start_day: int, today: int, top: int
                   ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], dict[str, list[tuple[Any, int, int]]]]:
    """Requests and refusals per minute since `start_min`, tokens per day since `start_day`, and the
    `top` keys and models by requests since `today` (epoch seconds, each a whole minute or day)."""
    tops: dict[str, list[tuple[Any, int, int]]] = {}
    async with pool.acquire() as conn:
        minutes = await conn.fetch("SELECT floor(ts / 60)::bigint * 60, count(*),"
                                   " count(*) FILTER (WHERE status <> 'allowed') FROM audit_events"
                                   " WHERE ts >= $1 GROUP BY 1", start_min)
        days = await conn.fetch("SELECT floor(ts / 86400)::bigint * 86400,"
                                " coalesce(sum(input_tokens), 0) + coalesce(sum(output_tokens), 0)"
                                " FROM audit_events WHERE ts >= $1 GROUP BY 1", start_day)
        for column in ("key_id", "model"):
            rows = await conn.fetch(f"SELECT {column}, count(*), coalesce(sum(input_tokens), 0)"
                                    f" + coalesce(sum(output_tokens), 0) FROM audit_events WHERE ts >= $1"
                                    f" AND {column} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $2", today, top)
            tops[column] = [(r[0], int(r[1]), int(r[2])) for r in rows]
    return ([(int(m), int(c), int(e)) for m, c, e in minutes], [(int(d), int(t)) for d, t in days], tops)


async def minted_sessions(pool: Any, key_id: str, since: float, actions: tuple[str, ...]) -> list[dict[str, Any]]:
    """search.minted_sessions over every replica's records: the sessions `key_id` minted since `since`."""
    sql = ("SELECT ts, admin->>'target', admin->>'action' FROM audit_events"
           " WHERE key_id = $1 AND ts >= $2 AND status = 'allowed' AND admin->>'action' = ANY($3::text[])"
           " ORDER BY ts DESC, event_id DESC LIMIT 1000")
    async with pool.acquire() as conn:
        rows = await conn.fetch(sql, key_id, since, list(actions))
    return [{"jti": jti, "minted_at": ts, "via": via} for ts, jti, via in rows if isinstance(jti, str)]
