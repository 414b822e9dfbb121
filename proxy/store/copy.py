"""`seekgate db copy`: move a whole store (a single-node SQLite install) into another, keys unchanged.

Rows are copied as they are: key hashes stay valid because the pepper moves with them
(envelope-encrypted, so the target's replicas need the same root key: crypto.root_key_file or
the same HSM/Vault key), revoked keys keep their revocation time, and the change sequence
continues above both stores' so no replica's cache can mistake the copy for an older state.
The target must be empty: merging two key populations is not a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.store import KeyRecord, StoreConflict
from proxy.store.backend import SecretRows, Store, open_secret_rows
from proxy.store.postgres import PostgresStore


@dataclass(frozen=True)
class CopyReport:
    keys: int
    revoked: int
    secrets: int
    data_keys: int
    revoked_sessions: int
    expiry_notices: int
    revision: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _parents_first(recs: list[KeyRecord]) -> list[KeyRecord]:
    """Keys ordered so each parent is inserted before its children (the foreign key demands it)."""
    by_id = {r.key_id: r for r in recs}
    done: set[str] = set()
    out: list[KeyRecord] = []

    def visit(r: KeyRecord, depth: int = 0) -> None:
        if r.key_id in done:
            return
        if depth > len(recs):
            raise StoreConflict(f"parent cycle at key {r.key_id!r}: repair the source first")
        parent = by_id.get(r.parent_id) if r.parent_id else None
        if parent is not None:
            visit(parent, depth + 1)
        done.add(r.key_id)
        out.append(r)
    for r in recs:
        visit(r)
    return out


async def copy_store(src: Store, dst: Store) -> CopyReport:
    """Copy every row of `src` into the empty `dst`; StoreConflict if `dst` already holds keys or secrets."""
    src_rows, dst_rows = await open_secret_rows(src), await open_secret_rows(dst)
    if await dst.list_keys() or await dst_rows.list_deks():
        raise StoreConflict("the target store is not empty; copy into a freshly migrated database")
    keys = _parents_first(await src.list_keys())
    for rec in keys:
        await dst.create_key(rec)
    notices = await _copy_notices(src, dst)
    deks, secrets = await _copy_secrets(src_rows, dst_rows)
    sessions = await _copy_sessions(src, dst)
    revision = await _continue_revision(src, dst)
    return CopyReport(keys=len(keys), revoked=sum(1 for r in keys if r.revoked_at is not None), secrets=secrets,
                      data_keys=deks, revoked_sessions=sessions, expiry_notices=notices, revision=revision)


async def _copy_secrets(src: SecretRows, dst: SecretRows) -> tuple[int, int]:
    deks = await src.list_deks()
    for dek_id, _, created_at, _ in deks:
        row = await src.get_dek(dek_id)
        assert row is not None, dek_id
        await dst.put_dek(dek_id, row[0], row[1], created_at)
    names = await src.secret_listing("")
    for name, created_at in names:
        secret = await src.get_secret(name)
        assert secret is not None, name
        await dst.add_secret(name, secret[0], secret[1], created_at)
    for event in ("dek", "root", "jwt", "pepper"):
        at = await src.event_time(event)
        if at is not None:
            await dst.record_event(event, at)
    return len(deks), len(names)


async def _rows(store: Store, sql: str) -> list[tuple[object, ...]]:
    """Every row of a table the KeyStore interface has no listing for (notices, the session denylist)."""
    if isinstance(store, PostgresStore):
        async with store.read("copy") as conn:
            return [tuple(r) for r in await conn.fetch(sql)]
    async with store.reading("copy") as db, db.execute(sql) as cur:
        return [tuple(r) for r in await cur.fetchall()]


async def _copy_notices(src: Store, dst: Store) -> int:
    rows = await _rows(src, "SELECT key_id, expires_at, announced_at FROM expiry_notices")
    for key_id, expires_at, announced_at in rows:
        await dst.claim_expiry_notice(str(key_id), float(expires_at), float(announced_at))  # type: ignore[arg-type]
    return len(rows)


async def _copy_sessions(src: Store, dst: Store) -> int:
    rows = await _rows(src, "SELECT jti, revoked_at FROM revoked_sessions")   # made by open_secret_rows
    dst_rows = await open_secret_rows(dst)
    for jti, revoked_at in rows:
        await dst_rows.revoke_session(str(jti), float(revoked_at))  # type: ignore[arg-type]
    return len(rows)


async def _continue_revision(src: Store, dst: Store) -> int:
    """Raise the target's change sequence past the source's, so it only ever moves forward."""
    target = max(await src.revision(), await dst.revision()) + 1
    await dst.set_revision_at_least(target)
    return await dst.revision()
