"""Envelope-encrypted secrets, wrapped data keys and revoked session ids, in the key store's SQLite file.

Only ciphertext lands here: `deks.wrapped` is a DEK wrapped by the KEK provider,
`secrets.blob` is AES-256-GCM under a DEK (see proxy/keys/envelope.py).
"""

from __future__ import annotations

from proxy.store.sqlite import SqliteStore, _guard

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS deks (
        dek_id     TEXT PRIMARY KEY,
        kek_id     TEXT NOT NULL,          -- which root wrapped it
        wrapped    BLOB NOT NULL,
        created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS secrets (
        name       TEXT PRIMARY KEY,
        dek_id     TEXT NOT NULL REFERENCES deks(dek_id),
        blob       BLOB NOT NULL,          -- nonce || AES-GCM ciphertext+tag
        created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS revoked_sessions (
        jti        TEXT PRIMARY KEY,
        revoked_at REAL NOT NULL)""",
)


class SqliteSecretRows:
    """The rows behind `Envelope` and session revocation, sharing the store's connection and write lock."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    @classmethod
    async def open(cls, store: SqliteStore) -> SqliteSecretRows:
        rows = cls(store)
        async with store._write("secrets_schema") as db:
            for stmt in _SCHEMA:
                await db.execute(stmt)
        return rows

    async def newest_dek(self) -> tuple[str, str, bytes] | None:
        """(dek_id, kek_id, wrapped) of the data key new writes use; None before the first."""
        async with _guard("newest_dek"):
            async with self._store._db.execute(
                    "SELECT dek_id, kek_id, wrapped FROM deks ORDER BY created_at DESC, dek_id LIMIT 1") as cur:
                row = await cur.fetchone()
        return None if row is None else (str(row[0]), str(row[1]), bytes(row[2]))

    async def get_dek(self, dek_id: str) -> tuple[str, bytes] | None:
        async with _guard("get_dek"):
            async with self._store._db.execute(
                    "SELECT kek_id, wrapped FROM deks WHERE dek_id = ?", (dek_id,)) as cur:
                row = await cur.fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    async def put_dek(self, dek_id: str, kek_id: str, wrapped: bytes, now: float) -> None:
        async with self._store._write("put_dek") as db:
            await db.execute("INSERT INTO deks (dek_id, kek_id, wrapped, created_at) VALUES (?, ?, ?, ?)",
                             (dek_id, kek_id, wrapped, now))

    async def get_secret(self, name: str) -> tuple[str, bytes] | None:
        """(dek_id, blob) of one secret; None if it was never stored."""
        async with _guard("get_secret"):
            async with self._store._db.execute(
                    "SELECT dek_id, blob FROM secrets WHERE name = ?", (name,)) as cur:
                row = await cur.fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    async def secret_names(self, prefix: str) -> list[str]:
        async with _guard("secret_names"):
            async with self._store._db.execute(
                    "SELECT name FROM secrets WHERE substr(name, 1, ?) = ? ORDER BY created_at, name",
                    (len(prefix), prefix)) as cur:
                return [str(r[0]) for r in await cur.fetchall()]

    async def add_secret(self, name: str, dek_id: str, blob: bytes, now: float) -> bool:
        """Insert unless the name exists (another process got there first); True if this one was stored."""
        async with self._store._write("add_secret") as db:
            cur = await db.execute("INSERT OR IGNORE INTO secrets (name, dek_id, blob, created_at) "
                                   "VALUES (?, ?, ?, ?)", (name, dek_id, blob, now))
            added = cur.rowcount == 1
            await cur.close()
        return added

    async def revoke_session(self, jti: str, now: float) -> bool:
        """Mark one session token revoked; False if it already was."""
        async with self._store._write("revoke_session") as db:
            cur = await db.execute("INSERT OR IGNORE INTO revoked_sessions (jti, revoked_at) VALUES (?, ?)",
                                   (jti, now))
            added = cur.rowcount == 1
            await cur.close()
            if added:
                await self._store._bump()   # verified-session caches (key_cache.py) watch the revision
        return added

    async def session_revoked(self, jti: str) -> bool:
        async with _guard("session_revoked"):
            async with self._store._db.execute(
                    "SELECT 1 FROM revoked_sessions WHERE jti = ?", (jti,)) as cur:
                return await cur.fetchone() is not None
