"""Envelope-encrypted secrets, crypto rotation times and the session denylist, in PostgreSQL.

The same rows and compare-and-swap updates as store/sqlite_secrets.py (read it for what each
is for); only ciphertext lands here. A session revocation bumps the change sequence and
notifies every replica, like a key revocation.
"""

from __future__ import annotations

from proxy.store.postgres import PostgresStore, command_count


class PostgresSecretRows:
    """The rows behind `Envelope` and session revocation, over the store's pool."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    @classmethod
    async def open(cls, store: PostgresStore) -> PostgresSecretRows:
        return cls(store)   # the tables come with the schema migrations (pg_schema.py)

    async def newest_dek(self) -> tuple[str, str, bytes] | None:
        async with self._store.read("newest_dek") as conn:
            row = await conn.fetchrow('SELECT dek_id, kek_id, wrapped FROM deks ORDER BY created_at DESC, '
                                      'dek_id COLLATE "C" DESC LIMIT 1')
        return None if row is None else (str(row[0]), str(row[1]), bytes(row[2]))

    async def get_dek(self, dek_id: str) -> tuple[str, bytes] | None:
        async with self._store.read("get_dek") as conn:
            row = await conn.fetchrow("SELECT kek_id, wrapped FROM deks WHERE dek_id = $1", dek_id)
        return None if row is None else (str(row[0]), bytes(row[1]))

    async def put_dek(self, dek_id: str, kek_id: str, wrapped: bytes, now: float) -> None:
        async with self._store.write("put_dek") as conn:
            await conn.execute("INSERT INTO deks (dek_id, kek_id, wrapped, created_at) VALUES ($1, $2, $3, $4)",
                               dek_id, kek_id, wrapped, now)

    async def get_secret(self, name: str) -> tuple[str, bytes] | None:
        async with self._store.read("get_secret") as conn:
            row = await conn.fetchrow("SELECT dek_id, blob FROM secrets WHERE name = $1", name)
        return None if row is None else (str(row[0]), bytes(row[1]))

    async def secret_names(self, prefix: str) -> list[str]:
        return [name for name, _ in await self.secret_listing(prefix)]

    async def add_secret(self, name: str, dek_id: str, blob: bytes, now: float) -> bool:
        async with self._store.write("add_secret") as conn:
            return command_count(await conn.execute(
                "INSERT INTO secrets (name, dek_id, blob, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                name, dek_id, blob, now)) == 1

    async def list_deks(self) -> list[tuple[str, str, float, int]]:
        async with self._store.read("list_deks") as conn:
            rows = await conn.fetch("SELECT d.dek_id, d.kek_id, d.created_at, "
                                    "(SELECT count(*) FROM secrets s WHERE s.dek_id = d.dek_id) "
                                    'FROM deks d ORDER BY d.created_at, d.dek_id COLLATE "C"')
        return [(str(r[0]), str(r[1]), float(r[2]), int(r[3])) for r in rows]

    async def rewrap_dek(self, dek_id: str, old_kek_id: str, new_kek_id: str, wrapped: bytes) -> bool:
        return await self._update_one("rewrap_dek", "UPDATE deks SET kek_id = $1, wrapped = $2 "
                                      "WHERE dek_id = $3 AND kek_id = $4", new_kek_id, wrapped, dek_id, old_kek_id)

    async def secrets_not_under(self, dek_id: str) -> list[str]:
        async with self._store.read("secrets_not_under") as conn:
            rows = await conn.fetch('SELECT name FROM secrets WHERE dek_id != $1 ORDER BY created_at, name COLLATE "C"',
                                    dek_id)
        return [str(r[0]) for r in rows]

    async def replace_secret(self, name: str, old_dek_id: str, new_dek_id: str, blob: bytes) -> bool:
        return await self._update_one("replace_secret", "UPDATE secrets SET dek_id = $1, blob = $2 "
                                      "WHERE name = $3 AND dek_id = $4", new_dek_id, blob, name, old_dek_id)

    async def _update_one(self, what: str, sql: str, *params: object) -> bool:
        async with self._store.write(what) as conn:
            return command_count(await conn.execute(sql, *params)) == 1

    async def delete_unused_deks(self, keep: str) -> list[str]:
        async with self._store.write("delete_unused_deks") as conn:
            rows = await conn.fetch("DELETE FROM deks WHERE dek_id != $1 AND NOT EXISTS "
                                    "(SELECT 1 FROM secrets s WHERE s.dek_id = deks.dek_id) RETURNING dek_id", keep)
        return sorted((str(r[0]) for r in rows), key=str.encode)

    async def secret_listing(self, prefix: str) -> list[tuple[str, float]]:
        async with self._store.read("secret_listing") as conn:
            rows = await conn.fetch('SELECT name, created_at FROM secrets WHERE starts_with(name, $1) '
                                    'ORDER BY created_at, name COLLATE "C"', prefix)
        return [(str(r[0]), float(r[1])) for r in rows]

    async def delete_secret(self, name: str) -> bool:
        async with self._store.write("delete_secret") as conn:
            return command_count(await conn.execute("DELETE FROM secrets WHERE name = $1", name)) == 1

    async def event_time(self, name: str) -> float | None:
        async with self._store.read("event_time") as conn:
            at = await conn.fetchval("SELECT at FROM crypto_events WHERE name = $1", name)
        return None if at is None else float(at)

    async def record_event(self, name: str, at: float, *, only_if_absent: bool = False) -> None:
        action = "NOTHING" if only_if_absent else "UPDATE SET at = EXCLUDED.at"
        async with self._store.write("record_event") as conn:
            await conn.execute(f"INSERT INTO crypto_events (name, at) VALUES ($1, $2) ON CONFLICT (name) DO {action}",
                               name, at)

    async def revoke_session(self, jti: str, now: float) -> bool:
        """Mark one session token revoked; False if it already was."""
        async with self._store.write("revoke_session") as conn:
            added = command_count(await conn.execute(
                "INSERT INTO revoked_sessions (jti, revoked_at) VALUES ($1, $2) ON CONFLICT DO NOTHING", jti, now)) == 1
            if added:
                await self._store.bump(conn)
        return added

    async def session_revoked(self, jti: str) -> bool:
        async with self._store.read("session_revoked") as conn:
            return await conn.fetchval("SELECT 1 FROM revoked_sessions WHERE jti = $1", jti) is not None
