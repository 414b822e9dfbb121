"""The shared key store of several replicas: PostgreSQL through an asyncpg pool (`store.url`).

The same KeyStore contract as the SQLite store (store/sqlite.py), query for query: a chain is
one recursive query with a decoy row for unknown ids, a revocation one recursive UPDATE, and
every change bumps the revision (the change sequence number) and notifies the listeners of
pg_changes.py in the same transaction. Text is ordered with COLLATE "C", SQLite's byte order,
so listings come out the same on both backends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from proxy.errors import StoreUnavailable
from proxy.store import KeyRecord, Rotated, StoreConflict
from proxy.store.pg_changes import CHANNEL, ChangeListener
from proxy.store.pg_schema import LATEST, migrate, schema_version
from proxy.store.rows import COLUMNS, MAX_DEPTH, from_row, page_clauses, to_row

_DECOY = ("'', repeat('0', 64), 'user', 'decoy-owner', '[\"user\"]'::jsonb, '{}'::jsonb, '[]'::jsonb, "
          "'[]'::jsonb, NULL::text, 'sgk_000000000000', '0000', 0::float8, NULL::float8, NULL::float8, "
          "'{}'::jsonb, 1, NULL::text")
_CHAIN_SQL = f"""
WITH RECURSIVE chain(id, depth) AS (
    SELECT $1::text, 0
    UNION ALL
    SELECT k.parent_id, chain.depth + 1 FROM keys k JOIN chain ON k.key_id = chain.id
    WHERE k.parent_id IS NOT NULL AND chain.depth < {MAX_DEPTH}
)
SELECT * FROM (
    SELECT {", ".join("k." + c.strip() for c in COLUMNS.split(","))}
    FROM chain JOIN keys k ON k.key_id = chain.id ORDER BY chain.depth
) found
UNION ALL
SELECT {_DECOY} WHERE NOT EXISTS (SELECT 1 FROM keys WHERE key_id = $1)
"""
_REVOKE_SQL = f"""
WITH RECURSIVE tree(id, depth) AS (
    SELECT $2::text, 0
    UNION ALL
    SELECT k.key_id, tree.depth + 1 FROM keys k JOIN tree ON k.parent_id = tree.id WHERE tree.depth < {MAX_DEPTH}
)
UPDATE keys SET revoked_at = $1 WHERE revoked_at IS NULL AND key_id IN (SELECT id FROM tree)
"""
_INSERT_SQL = f"INSERT INTO keys ({COLUMNS}) VALUES ({', '.join(f'${i + 1}' for i in range(len(COLUMNS.split(','))))})"

# What an unreachable, restarting or broken server (or a corrupt row) raises: "can't tell", so deny.
# InternalClientError is no PostgresError: asyncpg raises it for a read cut off by a server shutting
# down ("another operation is in progress"); unnamed, it was a 500 and failed cached keys too.
STORE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError,
                ValueError, TypeError, KeyError)


def command_count(status: str) -> int:
    """Rows touched, from a command tag such as 'UPDATE 3' or 'INSERT 0 1'."""
    return int(status.rsplit(" ", 1)[-1])


@asynccontextmanager
async def guard(what: str) -> AsyncIterator[None]:
    try:
        yield
    except STORE_ERRORS as exc:
        raise StoreUnavailable(f"store_unavailable: {what}: {exc.__class__.__name__}: {exc}") from exc


class PostgresStore:
    """KeyStore over PostgreSQL. Use `await PostgresStore.open(url)`, then `close()`."""

    def __init__(self, pool: Any, url: str, listener: ChangeListener, timeout_s: float) -> None:
        self.pool, self.url, self._listener, self.timeout_s = pool, url, listener, timeout_s

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10, auto_migrate: bool = False,
                   timeout_s: float = 2.0) -> PostgresStore:
        """Connect the pool and the change listener; the schema must be current (or `auto_migrate`)."""
        async with guard("open"):
            pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size, timeout=timeout_s,
                                             command_timeout=timeout_s)
        try:
            async with guard("open"), pool.acquire(timeout=timeout_s) as conn:
                if auto_migrate:
                    await migrate(conn)
                version = await schema_version(conn)
            if version != LATEST:
                raise StoreUnavailable(f"store_unavailable: the database schema is at version {version}, this "
                                       f"seekgate needs {LATEST}: run `seekgate db migrate` (or set store.auto_migrate)")
            listener = await ChangeListener.start(url, timeout_s=timeout_s)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, url, listener, timeout_s)

    async def close(self) -> None:
        await self._listener.close()
        await self.pool.close()

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def listener(self) -> ChangeListener:
        return self._listener

    @asynccontextmanager
    async def read(self, what: str) -> AsyncIterator[Any]:
        """A pooled connection for reads; any failure is StoreUnavailable."""
        async with guard(what), self.pool.acquire(timeout=self.timeout_s) as conn:
            yield conn

    @asynccontextmanager
    async def write(self, what: str) -> AsyncIterator[Any]:
        """A transaction on a pooled connection; committed when the block ends without an error."""
        async with guard(what), self.pool.acquire(timeout=self.timeout_s) as conn, conn.transaction():
            yield conn

    @staticmethod
    async def bump(conn: Any) -> None:
        """Advance the change sequence and tell every listener, both at this transaction's commit."""
        rev = await conn.fetchval("UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value")
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(rev))

    async def set_revision_at_least(self, value: int) -> None:
        """Move the change sequence forward to `value` (never back): a store copied in continues past its source."""
        async with self.write("set_revision") as conn:
            await conn.execute("UPDATE meta SET value = greatest(value, $1) WHERE name = 'revision'", value)
            await conn.execute("SELECT pg_notify($1, 'copy')", CHANNEL)

    async def create_key(self, rec: KeyRecord) -> None:
        """Insert a key. Raises StoreConflict on a duplicate id or an unknown parent."""
        try:
            async with self.write("create_key") as conn:
                await conn.execute(_INSERT_SQL, *to_row(rec))
                await self.bump(conn)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, asyncpg.IntegrityConstraintViolationError):
                raise StoreConflict(f"key {rec.key_id!r}: {exc.__cause__}") from exc.__cause__
            raise

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self.read("get_key") as conn:
            row = await conn.fetchrow(f"SELECT {COLUMNS} FROM keys WHERE key_id = $1", key_id)
            return None if row is None else from_row(row)

    async def get_chain(self, key_id: str) -> list[KeyRecord]:
        """The key, then its ancestors nearest first; [] if the key is unknown (after the same work)."""
        async with self.read("get_chain") as conn:
            chain = [from_row(r) for r in await conn.fetch(_CHAIN_SQL, key_id)]
            if chain and chain[0].key_id == "":
                return []   # the decoy
            if len({r.key_id for r in chain}) != len(chain):
                raise ValueError(f"parent cycle above key {key_id!r}")
            return chain

    async def list_keys(self) -> list[KeyRecord]:
        async with self.read("list_keys") as conn:
            return [from_row(r) for r in
                    await conn.fetch(f'SELECT {COLUMNS} FROM keys ORDER BY created_at, key_id COLLATE "C"')]

    async def children(self, parent_ids: list[str]) -> list[KeyRecord]:
        """The keys under any of `parent_ids`, oldest first: one query, the ids as one array value."""
        async with self.read("children") as conn:
            return [from_row(r) for r in await conn.fetch(
                f'SELECT {COLUMNS} FROM keys WHERE parent_id = ANY($1::text[]) ORDER BY created_at, key_id COLLATE "C"',
                parent_ids)]

    async def page_keys(self, limit: int, after: str | None = None,
                        expiring: tuple[float, float] | None = None) -> list[KeyRecord]:
        """As SqliteStore.page_keys. The database's own collation on both sides of the comparison and in
        ORDER BY, so the primary key's index serves the range and the order the cursor resumes in."""
        where, args = page_clauses(after, expiring, numbered=True)
        async with self.read("page_keys") as conn:
            rows = await conn.fetch(f"SELECT {COLUMNS} FROM keys{where} ORDER BY key_id LIMIT ${len(args) + 1}",
                                    *args, limit)
            return [from_row(r) for r in rows]

    async def list_expiring(self, within_s: float, now: float) -> list[KeyRecord]:
        async with self.read("list_expiring") as conn:
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM keys WHERE revoked_at IS NULL AND expires_at > $1 AND expires_at <= $2 "
                'ORDER BY expires_at, key_id COLLATE "C"', now, now + within_s)
            return [from_row(r) for r in rows]

    async def count_expiring(self, within_s: float, now: float) -> dict[str, int]:
        async with self.read("count_expiring") as conn:
            rows = await conn.fetch("SELECT tier, count(*) FROM keys WHERE revoked_at IS NULL AND expires_at > $1 "
                                    "AND expires_at <= $2 GROUP BY tier", now, now + within_s)
            return {str(r[0]): int(r[1]) for r in rows}

    async def revoke_key(self, key_id: str, now: float) -> int:
        """Revoke the key and every descendant; returns how many were newly revoked (earlier times kept)."""
        async with self.write("revoke_key") as conn:
            count = command_count(await conn.execute(_REVOKE_SQL, now, key_id))
            if count:
                await self.bump(conn)
        return count

    async def shorten_expiry(self, key_id: str, expires_at: float) -> bool:
        async with self.write("shorten_expiry") as conn:
            count = command_count(await conn.execute(
                "UPDATE keys SET expires_at = $1 WHERE key_id = $2 AND (expires_at IS NULL OR expires_at > $1)",
                expires_at, key_id))
            if count:
                await self.bump(conn)
        return count > 0

    async def rotate(self, key_id: str, successor: KeyRecord, expires_at: float, *,
                     move_children: bool) -> Rotated:
        """Claim, store the successor, move the children, shorten the expiry: one transaction (KeyStore.rotate)."""
        async with self.write("rotate") as conn:
            if not command_count(await conn.execute(
                    "UPDATE keys SET successor_id = $1 WHERE key_id = $2 AND successor_id IS NULL",
                    successor.key_id, key_id)):
                earlier = await conn.fetchval("SELECT successor_id FROM keys WHERE key_id = $1", key_id)
                if earlier is None:   # no such key: keys are never deleted, so the store is wrong
                    raise ValueError(f"key {key_id!r} vanished while it was rotated")
                return Rotated(earlier=str(earlier))
            await conn.execute(_INSERT_SQL, *to_row(successor))
            rows = await conn.fetch(
                "UPDATE keys SET parent_id = $1 WHERE parent_id = $2 AND revoked_at IS NULL RETURNING key_id, "
                "created_at", successor.key_id, key_id) if move_children else []
            await conn.execute(
                "UPDATE keys SET expires_at = $1 WHERE key_id = $2 AND (expires_at IS NULL OR expires_at > $1)",
                expires_at, key_id)
            await self.bump(conn)
        return Rotated(moved=tuple(str(r[0]) for r in sorted(rows, key=lambda r: (r[1], r[0].encode()))))

    async def claim_expiry_notice(self, key_id: str, expires_at: float, now: float) -> bool:
        async with self.write("claim_expiry_notice") as conn:
            return command_count(await conn.execute(
                "INSERT INTO expiry_notices (key_id, expires_at, announced_at) VALUES ($1, $2, $3) "
                "ON CONFLICT DO NOTHING", key_id, expires_at, now)) == 1

    async def rehash_secret(self, key_id: str, old_hash: str, new_hash: str, pepper_version: int) -> bool:
        """Replace a key's hash with one under a newer pepper if it still holds `old_hash`; no revision bump."""
        async with self.write("rehash_secret") as conn:
            return command_count(await conn.execute(
                "UPDATE keys SET secret_hash = $1, pepper_version = $2 WHERE key_id = $3 AND secret_hash = $4 "
                "AND pepper_version < $2", new_hash, pepper_version, key_id, old_hash)) == 1

    async def pepper_versions(self, now: float) -> dict[int, int]:
        async with self.read("pepper_versions") as conn:
            rows = await conn.fetch("SELECT pepper_version, count(*) FROM keys WHERE revoked_at IS NULL "
                                    "AND (expires_at IS NULL OR expires_at > $1) GROUP BY pepper_version", now)
            return {int(r[0]): int(r[1]) for r in rows}

    async def has_any_admin(self) -> bool:
        async with self.read("has_any_admin") as conn:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM keys WHERE revoked_at IS NULL AND roles @> $1::jsonb)",
                json.dumps(["admin"])))

    def change_signal(self) -> int | None:
        """Moves on every NOTIFY, and on every read while the channel is down (pg_changes.py)."""
        return self._listener.value()

    def change_signal_live(self) -> bool:
        return self._listener.connected

    async def revision(self) -> int:
        async with self.read("revision") as conn:
            value = await conn.fetchval("SELECT value FROM meta WHERE name = 'revision'")
            if value is None:
                raise ValueError("revision row missing")
            return int(value)
