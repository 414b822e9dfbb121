"""Envelope-encrypted secrets, wrapped data keys, rotation times and revoked session ids, in the key store's file.

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
    # When each kind of rotation last happened (dek, root, jwt, pepper): the schedules read it.
    """CREATE TABLE IF NOT EXISTS crypto_events (
        name       TEXT PRIMARY KEY,
        at         REAL NOT NULL)""",
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

    async def list_deks(self) -> list[tuple[str, str, float, int]]:
        """(dek_id, kek_id, created_at, how many secrets it encrypts) of every data key, oldest first."""
        async with _guard("list_deks"):
            async with self._store._db.execute(
                    "SELECT d.dek_id, d.kek_id, d.created_at, "
                    "(SELECT count(*) FROM secrets s WHERE s.dek_id = d.dek_id) "
                    "FROM deks d ORDER BY d.created_at, d.dek_id") as cur:
                return [(str(r[0]), str(r[1]), float(r[2]), int(r[3])) for r in await cur.fetchall()]

    async def rewrap_dek(self, dek_id: str, old_kek_id: str, new_kek_id: str, wrapped: bytes) -> bool:
        """Replace a DEK's wrapping, only if it is still wrapped by `old_kek_id` (another process may race)."""
        return await self._update_one("rewrap_dek",
                                      "UPDATE deks SET kek_id = ?, wrapped = ? WHERE dek_id = ? AND kek_id = ?",
                                      (new_kek_id, wrapped, dek_id, old_kek_id))

    async def secrets_not_under(self, dek_id: str) -> list[str]:
        """Names of the secrets encrypted under any data key but `dek_id`."""
        async with _guard("secrets_not_under"):
            async with self._store._db.execute(
                    "SELECT name FROM secrets WHERE dek_id != ? ORDER BY created_at, name", (dek_id,)) as cur:
                return [str(r[0]) for r in await cur.fetchall()]

    async def replace_secret(self, name: str, old_dek_id: str, new_dek_id: str, blob: bytes) -> bool:
        """Re-encryption: swap the row's ciphertext, only if it is still under `old_dek_id`."""
        return await self._update_one("replace_secret",
                                      "UPDATE secrets SET dek_id = ?, blob = ? WHERE name = ? AND dek_id = ?",
                                      (new_dek_id, blob, name, old_dek_id))

    async def _update_one(self, what: str, sql: str, params: tuple[object, ...]) -> bool:
        """A compare-and-swap UPDATE: True if it changed the one row it names (no other process got there first)."""
        async with self._store._write(what) as db:
            cur = await db.execute(sql, params)
            done = cur.rowcount == 1
            await cur.close()
        return done

    async def delete_unused_deks(self, keep: str) -> list[str]:
        """Delete the data keys (but `keep`, the current one) that no secret is encrypted under."""
        async with self._store._write("delete_unused_deks") as db:
            async with db.execute("SELECT dek_id FROM deks WHERE dek_id != ? AND NOT EXISTS "
                                  "(SELECT 1 FROM secrets s WHERE s.dek_id = deks.dek_id)", (keep,)) as cur:
                gone = [str(r[0]) for r in await cur.fetchall()]
            for dek_id in gone:
                await db.execute("DELETE FROM deks WHERE dek_id = ?", (dek_id,))
        return gone

    async def secret_listing(self, prefix: str) -> list[tuple[str, float]]:
        """(name, created_at) of the secrets whose name starts with `prefix`, oldest first."""
        async with _guard("secret_listing"):
            async with self._store._db.execute(
                    "SELECT name, created_at FROM secrets WHERE substr(name, 1, ?) = ? ORDER BY created_at, name",
                    (len(prefix), prefix)) as cur:
                return [(str(r[0]), float(r[1])) for r in await cur.fetchall()]

    async def delete_secret(self, name: str) -> bool:
        async with self._store._write("delete_secret") as db:
            cur = await db.execute("DELETE FROM secrets WHERE name = ?", (name,))
            done = cur.rowcount == 1
            await cur.close()
        return done

    async def event_time(self, name: str) -> float | None:
        """When the rotation `name` (dek, root, jwt, pepper) last happened; None if never recorded."""
        async with _guard("event_time"):
            async with self._store._db.execute("SELECT at FROM crypto_events WHERE name = ?", (name,)) as cur:
                row = await cur.fetchone()
        return None if row is None else float(row[0])

    async def record_event(self, name: str, at: float, *, only_if_absent: bool = False) -> None:
        verb = "INSERT OR IGNORE" if only_if_absent else "INSERT OR REPLACE"
        async with self._store._write("record_event") as db:
            await db.execute(f"{verb} INTO crypto_events (name, at) VALUES (?, ?)", (name, at))

    async def revoke_session(self, jti: str, now: float) -> bool:
        """Mark one session token revoked; False if it already was."""
        async with self._store._write("revoke_session") as db:
            cur = await db.execute("INSERT OR IGNORE INTO revoked_sessions (jti, revoked_at) VALUES (?, ?)",
                                   (jti, now))
            added = cur.rowcount == 1
            await cur.close()
            if added:
                await self._store._bump()   # verified-session caches (keys/cache.py) watch the revision
        return added

    async def session_revoked(self, jti: str) -> bool:
        async with _guard("session_revoked"):
            async with self._store._db.execute(
                    "SELECT 1 FROM revoked_sessions WHERE jti = ?", (jti,)) as cur:
                return await cur.fetchone() is not None
