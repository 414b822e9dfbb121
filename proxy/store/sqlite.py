"""The default key store: one SQLite file in WAL mode, over aiosqlite."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from proxy.errors import StoreUnavailable
from proxy.store import KeyRecord, Rotated, StoreConflict
from proxy.store.change_signal import ChangeSignal
from proxy.store.rows import COLUMNS as _COLUMNS
from proxy.store.rows import MAX_DEPTH, from_row, page_clauses
from proxy.store.rows import to_row as _to_row
from proxy.store.wal import enable_wal_async

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id        TEXT PRIMARY KEY,
    secret_hash   TEXT NOT NULL,
    tier          TEXT NOT NULL,
    owner         TEXT NOT NULL,
    roles         TEXT NOT NULL DEFAULT '[]',   -- JSON array
    labels        TEXT NOT NULL DEFAULT '{}',   -- JSON object
    models        TEXT NOT NULL DEFAULT '[]',   -- JSON array
    allowed_cidrs TEXT NOT NULL DEFAULT '[]',   -- JSON array
    parent_id     TEXT REFERENCES keys(key_id),
    prefix        TEXT NOT NULL DEFAULT '',
    last4         TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL,
    expires_at    REAL,
    revoked_at    REAL,
    limits        TEXT NOT NULL DEFAULT '{}',   -- JSON object: the limits the key sets itself
    pepper_version INTEGER NOT NULL DEFAULT 1,  -- which pepper secret_hash was made with (keys/hashing.py)
    successor_id  TEXT                          -- the key a rotation issued in its place (keys/lifecycle.py)
);
CREATE INDEX IF NOT EXISTS keys_parent ON keys(parent_id);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- Expiry warnings already written to the audit log: one per key and expiry, across restarts.
CREATE TABLE IF NOT EXISTS expiry_notices (
    key_id       TEXT NOT NULL REFERENCES keys(key_id),
    expires_at   REAL NOT NULL,
    announced_at REAL NOT NULL,
    PRIMARY KEY (key_id, expires_at)
);
INSERT OR IGNORE INTO meta(name, value) VALUES ('revision', 0);
"""

# Columns added after the first release: (name, definition) for ALTER TABLE on an older database.
_ADDED_COLUMNS = (("limits", "TEXT NOT NULL DEFAULT '{}'"), ("pepper_version", "INTEGER NOT NULL DEFAULT 1"),
                  ("successor_id", "TEXT"))

# An unknown key id reads the chain of a real key instead (the first top-level one), which get_chain
# then drops: the same lookups, the same row read and converted, so the answer time does not tell
# whether the id exists.
_CHAIN_SQL = f"""
WITH RECURSIVE chain(id, depth) AS (
    SELECT COALESCE((SELECT key_id FROM keys WHERE key_id = :key_id),
                    (SELECT key_id FROM keys WHERE parent_id IS NULL LIMIT 1)), 0
    UNION ALL
    SELECT k.parent_id, chain.depth + 1 FROM keys k JOIN chain ON k.key_id = chain.id
    WHERE k.parent_id IS NOT NULL AND chain.depth < {MAX_DEPTH}
)
SELECT {", ".join("k." + c.strip() for c in _COLUMNS.split(","))}
FROM chain JOIN keys k ON k.key_id = chain.id ORDER BY chain.depth
"""

# The CTE sits inside the subquery: with a leading WITH, sqlite3 reports rowcount -1.
_REVOKE_SQL = f"""
UPDATE keys SET revoked_at = ?
WHERE revoked_at IS NULL AND key_id IN (
    WITH RECURSIVE tree(id, depth) AS (
        SELECT ?, 0
        UNION ALL
        SELECT k.key_id, tree.depth + 1 FROM keys k JOIN tree ON k.parent_id = tree.id
        WHERE tree.depth < {MAX_DEPTH}
    )
    SELECT id FROM tree
)
"""

_INSERT_SQL = f"INSERT INTO keys ({_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMNS.split(',')))})"

# Parents per `IN (...)` of a subtree walk's level: well under SQLite's bound on a statement's values
# (SQLITE_MAX_VARIABLE_NUMBER, 999 before 3.32), so a level of 10k devices is a few queries, not 10k.
_IN_CHUNK = 500

_HAS_ADMIN_SQL = """
SELECT EXISTS (
    SELECT 1 FROM keys, json_each(keys.roles) AS r
    WHERE keys.revoked_at IS NULL AND r.value = 'admin'
)
"""

# What a broken, locked, missing or corrupt database can raise; all of it means
# "can't tell", which must deny rather than let a request through.
_STORE_ERRORS = (sqlite3.Error, OSError, ValueError, TypeError, KeyError)


# Looked up by name at each call, so a test can wrap it.
_from_row = from_row


async def _migrate(db: aiosqlite.Connection) -> None:
    """Add the columns a database made by an older seekgate lacks (CREATE IF NOT EXISTS skips them).

    The workers of the first start after an upgrade all open the old database at once: the look at the
    table and the ALTER TABLE are one write transaction, so a worker that waited for another's sees the
    column it added instead of adding it again ("duplicate column name", a failed start).
    """
    if not await _missing_columns(db):
        return   # the usual open: no write lock taken
    await db.execute("BEGIN IMMEDIATE")   # waits out another connection's migration (busy_timeout)
    try:
        for name, definition in await _missing_columns(db):
            await db.execute(f"ALTER TABLE keys ADD COLUMN {name} {definition}")
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise


async def _missing_columns(db: aiosqlite.Connection) -> list[tuple[str, str]]:
    async with db.execute("PRAGMA table_info(keys)") as cur:
        have = {row[1] for row in await cur.fetchall()}
    return [(name, definition) for name, definition in _ADDED_COLUMNS if name not in have]


@asynccontextmanager
async def _guard(what: str) -> AsyncIterator[None]:
    try:
        yield
    except _STORE_ERRORS as exc:
        raise StoreUnavailable(f"store_unavailable: {what}: {exc.__class__.__name__}: {exc}") \
            from exc


async def _prepare(db: aiosqlite.Connection, wal_wait_s: float) -> None:
    """WAL, foreign keys, the schema and its migrations on a new connection."""
    await enable_wal_async(db, wal_wait_s)
    await db.execute("PRAGMA foreign_keys = ON")
    await db.executescript(_SCHEMA)
    await _migrate(db)


class SqliteStore:
    """KeyStore over one SQLite file. Use `await SqliteStore.open(path)`, then `close()`."""

    def __init__(self, db: aiosqlite.Connection, path: Path, signal: ChangeSignal) -> None:
        self._db = db
        self.path = path
        # One connection is shared by every coroutine; serialise write transactions on it.
        self._write_lock = asyncio.Lock()
        self._signal = signal   # tells every process's key cache of a change
        self._bumped = False                       # this transaction changed the revision

    @classmethod
    async def open(cls, path: Path, *, busy_timeout_ms: int = 5000) -> SqliteStore:
        """Open (creating if needed) the database: WAL, busy timeout, foreign keys, schema."""
        path = Path(path)
        async with _guard("open"):
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                # Hashes are not secrets, but nobody else needs to read them; SQLite
                # gives the -wal/-shm files the same mode as the database.
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            # Fail on an unopenable path here: aiosqlite leaves its worker thread to
            # finish a failed connect after we have returned.
            await asyncio.to_thread(lambda: sqlite3.connect(path).close())
            # isolation_level=None: we issue BEGIN ourselves, so a write and its
            # revision bump commit together.
            db = await aiosqlite.connect(path, isolation_level=None)
            try:
                await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                await _prepare(db, busy_timeout_ms / 1000.0)
                signal = ChangeSignal.beside(path)
            except BaseException:
                await db.close()
                raise
        return cls(db, path, signal)

    async def close(self) -> None:
        await self._db.close()
        self._signal.close()

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _write(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock, _guard(what):
            # IMMEDIATE takes the write lock up front, so busy_timeout applies here
            # rather than failing half-way through.
            await self._db.execute("BEGIN IMMEDIATE")
            self._bumped = False
            try:
                yield self._db
            except BaseException:
                # Some errors end the transaction themselves; don't mask them with
                # "no transaction is active".
                if self._db.in_transaction:
                    await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")
            if self._bumped:   # after the commit, before the caller hears it is done (change_signal.py)
                self._signal.changed()

    @asynccontextmanager
    async def reading(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, for a read the interface has no method for (`db copy`); failures are StoreUnavailable."""
        async with _guard(what):
            yield self._db

    async def set_revision_at_least(self, value: int) -> None:
        """Move the change sequence forward to `value` (never back): a store copied in continues past its source."""
        async with self._write("set_revision") as db:
            await db.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'revision'", (value,))
            self._bumped = True

    async def _bump(self) -> None:
        await self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        self._bumped = True

    async def create_key(self, rec: KeyRecord) -> None:
        """Insert a key. Raises StoreConflict on a duplicate id or an unknown parent."""
        try:
            async with self._write("create_key") as db:
                await db.execute(_INSERT_SQL, _to_row(rec))
                await self._bump()
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise StoreConflict(f"key {rec.key_id!r}: {exc.__cause__}") from exc.__cause__
            raise

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with _guard("get_key"):
            async with self._db.execute(f"SELECT {_COLUMNS} FROM keys WHERE key_id = ?",
                                        (key_id,)) as cur:
                row = await cur.fetchone()
            return None if row is None else _from_row(row)

    async def get_chain(self, key_id: str) -> list[KeyRecord]:
        """The key, then its ancestors nearest first; [] if the key is unknown (after the same work)."""
        async with _guard("get_chain"):
            async with self._db.execute(_CHAIN_SQL, {"key_id": key_id}) as cur:
                rows = await cur.fetchall()
            chain = [_from_row(r) for r in rows]
            if chain and chain[0].key_id != key_id:
                return []   # the stand-in chain read for an unknown id
            if len({r.key_id for r in chain}) != len(chain):
                raise ValueError(f"parent cycle above key {key_id!r}")
            return chain

    async def list_keys(self) -> list[KeyRecord]:
        async with _guard("list_keys"):
            async with self._db.execute(
                    f"SELECT {_COLUMNS} FROM keys ORDER BY created_at, key_id") as cur:
                rows = await cur.fetchall()
            return [_from_row(r) for r in rows]

    async def children(self, parent_ids: list[str]) -> list[KeyRecord]:
        """The keys under any of `parent_ids`, oldest first: a query per _IN_CHUNK parents."""
        out: list[KeyRecord] = []
        async with _guard("children"):
            for at in range(0, len(parent_ids), _IN_CHUNK):
                chunk = parent_ids[at:at + _IN_CHUNK]
                async with self._db.execute(f"SELECT {_COLUMNS} FROM keys WHERE parent_id IN "
                                            f"({', '.join('?' * len(chunk))})", chunk) as cur:
                    out += [_from_row(r) for r in await cur.fetchall()]
        # Sorted here, not by each query, so the chunks come out in one order; str order is SQLite's byte order.
        return sorted(out, key=lambda r: (r.created_at, r.key_id))

    async def page_keys(self, limit: int, after: str | None = None,
                        expiring: tuple[float, float] | None = None) -> list[KeyRecord]:
        """Up to `limit` keys in key id order, after the key id `after`; `expiring` (start, end): only
        unrevoked keys expiring after start and by end. Keyset paging, so every page is one primary-key
        range read: a page deep into 100k keys costs what the first one does, and no key is skipped or
        repeated when keys are added between pages."""
        where, args = page_clauses(after, expiring)
        async with _guard("page_keys"):
            async with self._db.execute(f"SELECT {_COLUMNS} FROM keys{where} ORDER BY key_id LIMIT ?",
                                        (*args, limit)) as cur:
                rows = await cur.fetchall()
            return [_from_row(r) for r in rows]

    async def list_expiring(self, within_s: float, now: float) -> list[KeyRecord]:
        async with _guard("list_expiring"):
            async with self._db.execute(
                    f"SELECT {_COLUMNS} FROM keys WHERE revoked_at IS NULL AND expires_at > ? AND expires_at <= ? "
                    "ORDER BY expires_at, key_id", (now, now + within_s)) as cur:
                rows = await cur.fetchall()
            return [_from_row(r) for r in rows]

    async def count_expiring(self, within_s: float, now: float) -> dict[str, int]:
        async with _guard("count_expiring"):
            async with self._db.execute(
                    "SELECT tier, count(*) FROM keys WHERE revoked_at IS NULL AND expires_at > ? AND expires_at <= ? "
                    "GROUP BY tier", (now, now + within_s)) as cur:
                return {tier: n for tier, n in await cur.fetchall()}

    async def revoke_key(self, key_id: str, now: float) -> int:
        """Revoke the key and every descendant; returns how many were newly revoked.

        Keys already revoked keep their original revocation time.
        """
        async with self._write("revoke_key") as db:
            cur = await db.execute(_REVOKE_SQL, (now, key_id))
            count = cur.rowcount
            await cur.close()
            if count:
                await self._bump()
        return count

    async def shorten_expiry(self, key_id: str, expires_at: float) -> bool:
        """Bring the key's expiry forward to `expires_at`; never extends it. True if it changed."""
        async with self._write("shorten_expiry") as db:
            cur = await db.execute(
                "UPDATE keys SET expires_at = ? WHERE key_id = ? "
                "AND (expires_at IS NULL OR expires_at > ?)", (expires_at, key_id, expires_at))
            count = cur.rowcount
            await cur.close()
            if count:
                await self._bump()
        return count > 0

    async def rotate(self, key_id: str, successor: KeyRecord, expires_at: float, *,
                     move_children: bool) -> Rotated:
        """Claim, store the successor, move the children, shorten the expiry: one transaction (KeyStore.rotate).

        Revoked children stay where they were revoked, so the record of what was under whom holds.
        """
        async with self._write("rotate") as db:
            cur = await db.execute("UPDATE keys SET successor_id = ? WHERE key_id = ? AND successor_id IS NULL",
                                   (successor.key_id, key_id))
            claimed = cur.rowcount == 1
            await cur.close()
            if not claimed:
                async with db.execute("SELECT successor_id FROM keys WHERE key_id = ?", (key_id,)) as cur:
                    row = await cur.fetchone()
                if row is None or row[0] is None:   # no such key: keys are never deleted, so the store is wrong
                    raise ValueError(f"key {key_id!r} vanished while it was rotated")
                return Rotated(earlier=str(row[0]))
            await db.execute(_INSERT_SQL, _to_row(successor))
            moved: list[str] = []
            if move_children:
                async with db.execute("SELECT key_id FROM keys WHERE parent_id = ? AND revoked_at IS NULL "
                                      "ORDER BY created_at, key_id", (key_id,)) as cur:
                    moved = [str(r[0]) for r in await cur.fetchall()]
                await db.execute("UPDATE keys SET parent_id = ? WHERE parent_id = ? AND revoked_at IS NULL",
                                 (successor.key_id, key_id))
            await db.execute("UPDATE keys SET expires_at = ? WHERE key_id = ? "
                             "AND (expires_at IS NULL OR expires_at > ?)", (expires_at, key_id, expires_at))
            await self._bump()
        return Rotated(moved=tuple(moved))

    async def claim_expiry_notice(self, key_id: str, expires_at: float, now: float) -> bool:
        """Record that `key_id`'s expiry `expires_at` is announced; False if it already was."""
        async with self._write("claim_expiry_notice") as db:
            cur = await db.execute("INSERT OR IGNORE INTO expiry_notices (key_id, expires_at, announced_at) "
                                   "VALUES (?, ?, ?)", (key_id, expires_at, now))
            claimed = cur.rowcount == 1
            await cur.close()
        return claimed

    async def rehash_secret(self, key_id: str, old_hash: str, new_hash: str, pepper_version: int) -> bool:
        """Replace a key's hash with one under a newer pepper, only if it still holds `old_hash`.

        No revision bump: the key's meaning is unchanged, so caches stay valid. Never waits for the write
        lock: on its own short-lived connection with no busy timeout, so while another process holds the
        lock it fails at once (StoreUnavailable; the key's next use tries again) instead of holding this
        store's one connection, and every key lookup queued behind it, for the busy timeout.
        """
        async with _guard("rehash_secret"):
            return await asyncio.to_thread(self._rehash_now, key_id, old_hash, new_hash, pepper_version)

    def _rehash_now(self, key_id: str, old_hash: str, new_hash: str, pepper_version: int) -> bool:
        db = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")   # SQLITE_BUSY at once if the write lock is taken
            try:
                count = db.execute("UPDATE keys SET secret_hash = ?, pepper_version = ? "
                                   "WHERE key_id = ? AND secret_hash = ? AND pepper_version < ?",
                                   (new_hash, pepper_version, key_id, old_hash, pepper_version)).rowcount
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return count == 1
        finally:
            db.close()

    async def pepper_versions(self, now: float) -> dict[int, int]:
        """How many live (unrevoked, unexpired) keys are hashed under each pepper version."""
        async with _guard("pepper_versions"):
            async with self._db.execute(
                    "SELECT pepper_version, count(*) FROM keys WHERE revoked_at IS NULL "
                    "AND (expires_at IS NULL OR expires_at > ?) GROUP BY pepper_version", (now,)) as cur:
                return {int(r[0]): int(r[1]) for r in await cur.fetchall()}

    async def has_any_admin(self) -> bool:
        """Whether any unrevoked key has the role "admin" (bootstrap check)."""
        async with _guard("has_any_admin"):
            async with self._db.execute(_HAS_ADMIN_SQL) as cur:
                row = await cur.fetchone()
            return bool(row and row[0])

    def change_signal(self) -> int | None:
        """Differs from its last value once any process has committed a change (store/change_signal.py)."""
        return self._signal.value()

    def change_signal_live(self) -> bool:
        return True   # the shared word is rewritten by commits only

    async def revision(self) -> int:
        async with _guard("revision"):
            async with self._db.execute(
                    "SELECT value FROM meta WHERE name = 'revision'") as cur:
                row = await cur.fetchone()
            if row is None:
                raise ValueError("revision row missing")
            return int(row[0])
