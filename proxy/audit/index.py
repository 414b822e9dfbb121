"""The audit index in SQLite: schema, rows, connection settings, and `seekgate audit query`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from datetime import datetime
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.store.wal import enable_wal

from .jsonl import names_file

log = logging.getLogger(__name__)

# Order is the JSONL key order and the SQLite column order; never add a credential here.
FIELDS: tuple[str, ...] = (
    "timestamp", "event_id", "request_id", "actor", "key_id", "tier", "action", "resource",
    "model", "status", "http_status", "reason", "client_ip", "duration_ms", "upstream_ms",
    "input_tokens", "output_tokens", "protocol", "method", "path", "rule",
    # The principal's ancestor key ids, nearest first (a session's parent key, a device's app
    # key): the leak report finds a leaked key's sessions by it. Last, because an audit.db made
    # before it gets it by ALTER TABLE, which appends.
    "parent_key_ids",
    # The OpenAI API's {endpoint, user} (frontend/openai.py), absent from other records: what
    # `audit query --endpoint` and the admin search filter on. Appended by ALTER TABLE the same way.
    "openai",
    # An admin call's {action, target, detail, before, after}: a key's live sessions are found by
    # their mint records (sessions.mint, console.signin), since session tokens are not stored.
    "admin",
)
# Decoded from their JSON text when read back from the index.
_JSON_FIELDS = {"parent_key_ids", "openai", "admin"}
# Fields only some records carry: read with .get, so every other field stays one itemgetter call.
OPTIONAL_FIELDS = ("openai", "admin")
_INT_FIELDS = {"http_status", "input_tokens", "output_tokens"}
_REAL_FIELDS = {"duration_ms", "upstream_ms"}


def _column_type(field: str) -> str:
    return "INTEGER" if field in _INT_FIELDS else "REAL" if field in _REAL_FIELDS else "TEXT"


_COLUMNS = ", ".join(f"{f} {_column_type(f)}" + (" PRIMARY KEY" if f == "event_id" else "") for f in FIELDS)
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS audit (ts REAL NOT NULL, {_COLUMNS})",
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts)",
    "CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor, ts)",
    "CREATE INDEX IF NOT EXISTS audit_key_id ON audit (key_id, ts)",
)
# OR IGNORE makes a retried batch idempotent: event_id is the primary key.
_INSERT_HEAD = f"INSERT OR IGNORE INTO audit (ts, {', '.join(FIELDS)}) VALUES "
_ROW_MARKS = f"({', '.join('?' * (len(FIELDS) + 1))})"


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


_ALWAYS = tuple(f for f in FIELDS if f not in OPTIONAL_FIELDS)
assert FIELDS[len(_ALWAYS):] == OPTIONAL_FIELDS, "optional fields come last, in column order"
_values = itemgetter(*_ALWAYS)
_PLAIN_TYPES = frozenset(_PLAIN)
_JSON_AT = tuple(1 + FIELDS.index(f) for f in sorted(_JSON_FIELDS))   # their places in a row (ts first)
_to_json = json.JSONEncoder(default=str).encode   # one encoder: json.dumps(default=...) builds one per call


def row(rec: dict[str, Any]) -> tuple[Any, ...]:
    try:
        ts = _epoch(str(rec["timestamp"]))
    except (KeyError, ValueError):  # a malformed record must not wedge the writer in retries
        ts = time.time()
    try:
        values = [ts, *_values(rec), *map(rec.get, OPTIONAL_FIELDS)]   # one C call for the record build_record makes
    except KeyError:
        values = [ts, *map(rec.get, FIELDS)]
    # sqlite3 binds plain values only: the JSON fields (parent_key_ids is a list) become their text.
    for i in _JSON_AT:
        if (v := values[i]).__class__ not in _PLAIN_TYPES and not isinstance(v, _PLAIN):
            values[i] = _to_json(v)
    if not _PLAIN_TYPES.issuperset(map(type, values)):   # anything else that is not (rare: a bad record)
        values = [v if isinstance(v, _PLAIN) else _to_json(v) for v in values]
    return tuple(values)


# How long an index write waits for another connection's lock (sqlite3's default is 5 s).
_BUSY_TIMEOUT_S = 1.0

_ROWS_PER_STATEMENT = 64   # 64 x 24 bound values, far below SQLite's 32766

# The byte of a -shm file every process with the database open holds a shared lock on (SQLite's os_unix.c
# UNIX_SHM_DMS: (22 + SQLITE_SHM_NLOCK) * 4 + SQLITE_SHM_NLOCK). Taking it exclusively succeeds only where
# no other process has that database open.
_SHM_DMS_BYTE = 128


@lru_cache(maxsize=_ROWS_PER_STATEMENT)
def _insert_rows_sql(n: int) -> str:
    return _INSERT_HEAD + ", ".join([_ROW_MARKS] * n)


# The OpenAI endpoint of a record, for a filter (NULL for records of other APIs).
ENDPOINT_CLAUSE = "json_extract(audit.openai, '$.endpoint') = ?"


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """An audit.db from an older version lacks the fields added since: add them (NULL in old rows)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(audit)")}
    for field in FIELDS:
        if field not in have:
            db.execute(f"ALTER TABLE audit ADD COLUMN {field} {_column_type(field)}")


class AuditIndex:
    """The writer's connection to audit.db, used from one worker thread at a time (asyncio.to_thread).

    Synchronous, so that a whole batch is indexed in one call on the worker thread (aiosqlite would
    make every statement and the commit a hand-off of their own). Rows go in 64 to a statement
    because sqlite3 releases the GIL around every statement it steps: with a row per statement the
    thread waited for the GIL once per row, and a busy event loop hands the GIL over only every
    5 ms, which throttled the index to a few hundred rows a second under load while the queue, and
    the memory holding it, grew.

    WAL with synchronous=NORMAL survives a process crash; a host crash can lose the last commits,
    which is why the fsynced JSONL file, not this index, is the durable record: the writer
    re-indexes the file's tail at start. A second fsync per group commit would cost strict mode
    throughput for nothing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None   # (st_dev, st_ino) of the file the connection has open
        # Set when audit.db was found deleted or replaced and a new one opened; the writer then re-indexes
        # the JSONL tail into it (as a start does) and clears it.
        self.replaced = False

    def open(self) -> None:
        """Opens audit.db (schema included) now, so that a broken one is known at start."""
        self._connection()

    def insert(self, records: list[dict[str, Any]]) -> None:
        """Indexes records (OR IGNORE: one already there is skipped); all or nothing."""
        db = self._connection()
        rows = [row(r) for r in records]
        try:
            for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                chunk = rows[start:start + _ROWS_PER_STATEMENT]
                db.execute(_insert_rows_sql(len(chunk)), [cell for r in chunk for cell in r])
            db.commit()
        except sqlite3.Error:
            self._abandon()
            raise

    def prune(self, cutoff: float) -> None:
        db = self._connection()
        try:
            db.execute("DELETE FROM audit WHERE ts < ?", (cutoff,))
            db.commit()
        except sqlite3.Error:
            self._abandon()
            raise

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is not None and self._moved():
            # Deleted or replaced under us (an operator freeing space, a restore): rows committed to the
            # unlinked file would be in no audit.db any reader opens, so queries missed every new record
            # until a restart. Let go of it and open the file at the path, as audit.jsonl is reopened.
            log.warning("audit index %s was deleted or replaced while open; opening a new one", self.path)
            self.close()
            self.replaced = True
        if self._db is None:
            # sqlite3 opens a transaction before the first INSERT or DELETE (not before PRAGMA or
            # CREATE), so each insert() or prune() is one transaction, ended by its commit().
            # A short busy wait: a lock held longer (another process in a transaction) fails the insert,
            # and the writer keeps the rows for a later retry instead of stalling audit.jsonl behind it.
            # Making a new file: workers take turns (_Reopen); an existing one is opened as it is.
            with _Reopen(self.path) if not self.path.exists() else contextlib.nullcontext():
                if not self.path.exists():
                    _drop_orphaned_wal(self.path)
                db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
                try:
                    enable_wal(db)   # several workers may open a new audit.db at once
                    db.execute("PRAGMA synchronous=NORMAL")
                    for stmt in _SCHEMA:
                        db.execute(stmt)
                    _add_missing_columns(db)
                    st = os.stat(self.path)
                except BaseException:
                    db.close()
                    raise
            self._db, self._file_id = db, (st.st_dev, st.st_ino)
        return self._db

    def _moved(self) -> bool:
        """The path no longer names the open file. One stat per batch indexed."""
        assert self._file_id is not None
        return not names_file(self.path, self._file_id)

    def _abandon(self) -> None:
        """After a failed statement: roll back, or drop a connection that cannot; the next call reconnects."""
        assert self._db is not None
        try:
            self._db.rollback()
        except sqlite3.Error:
            self.close()


class _Reopen:
    """An exclusive flock on .audit.db.lock (a name `rm audit.db*` leaves alone): workers that find audit.db
    missing take turns to make it, so one never removes the -wal/-shm another has just made as the deleted one's."""

    def __init__(self, path: Path) -> None:
        self._path = path.with_name(f".{path.name}.lock")
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(self._fd, fcntl.LOCK_EX)   # held for one open: milliseconds

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)   # releases the flock


def _drop_orphaned_wal(path: Path) -> None:
    """Remove the -wal/-shm a deleted audit.db left at the path, or raise while a process still has it open.

    A new database opened beside them would take the deleted one's WAL as its own (SQLite matches the files
    by name), pages of another database over an empty file: a corrupt index. Normally the writer closing the
    deleted file was its last connection, and SQLite removed them then. If they remain, another process (a
    worker that has not noticed yet, a reader) still holds that database: once the last one closes, the
    files go or are orphaned, and the writer's retry opens the new index.
    """
    wal, shm = path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")
    if not wal.exists() and not shm.exists():
        return
    try:
        fd = os.open(shm, os.O_RDWR)
    except FileNotFoundError:
        fd = -1   # a WAL without its shared memory: nothing can be using it
    if fd >= 0:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_BYTE, os.SEEK_SET)
        except OSError:
            raise sqlite3.OperationalError(
                f"{path} was deleted and another process still has it open; a new index is opened "
                "once it lets go") from None
        finally:
            os.close(fd)   # and with it the lock just taken
    wal.unlink(missing_ok=True)
    shm.unlink(missing_ok=True)


async def query_audit(data_dir: Path, actor: str | None = None, key_id: str | None = None,
                      since: float | None = None, until: float | None = None,
                      status: str | None = None, limit: int = 100,
                      ancestor: str | None = None, protocol: str | None = None,
                      endpoint: str | None = None) -> list[dict[str, Any]]:
    """Records matching every given filter, newest first. `since`/`until` are epoch seconds.

    `protocol`: http, grpc or openai (the API used); `endpoint`: the OpenAI endpoint, e.g. /v1/completions.

    `ancestor`: records of principals under that key (its sessions, devices and their uses),
    found in parent_key_ids. No index serves it: bound it with `since`, which one does.
    """
    db_path = Path(data_dir) / "audit" / "audit.db"
    if not db_path.exists():
        return []
    where, args = [], []
    for clause, value in (("actor = ?", actor), ("key_id = ?", key_id), ("ts >= ?", since),
                          ("ts < ?", until), ("status = ?", status), ("protocol = ?", protocol),
                          (ENDPOINT_CLAUSE, endpoint),
                          ("EXISTS (SELECT 1 FROM json_each(audit.parent_key_ids) WHERE value = ?)",
                           ancestor)):
        if value is not None:
            where.append(clause)
            args.append(value)
    async with aiosqlite.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True) as db:
        # Read-only: an audit.db no writer has opened since an upgrade may lack newer columns.
        async with db.execute("PRAGMA table_info(audit)") as cur:
            have = {r[1] for r in await cur.fetchall()}
        if (ancestor is not None and "parent_key_ids" not in have) or (endpoint is not None and "openai" not in have):
            return []
        columns = ", ".join(f if f in have else f"NULL AS {f}" for f in FIELDS)
        sql = (f"SELECT {columns} FROM audit"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + " ORDER BY ts DESC, rowid DESC LIMIT ?")
        async with db.execute(sql, (*args, max(0, limit))) as cur:
            return [_decoded(dict(zip(FIELDS, r, strict=True))) for r in await cur.fetchall()]


def _decoded(record: dict[str, Any]) -> dict[str, Any]:
    for field in _JSON_FIELDS:
        if isinstance(record.get(field), str):
            record[field] = json.loads(record[field])
    return record
